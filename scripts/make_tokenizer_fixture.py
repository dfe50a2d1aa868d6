#!/usr/bin/env python3
"""Generate a tokenizer parity fixture from a GGUF file with Hugging Face `transformers`.

What it does
------------
Loads the tokenizer stored in a GGUF file's metadata (vocabulary, merges, token types,
`tokenizer.ggml.pre`) through an implementation independent of this crate:

    AutoTokenizer.from_pretrained(<dir of the gguf>, gguf_file=<file name>)

then encodes a fixed list of varied strings (plain English, whitespace runs, digits,
contractions, code, many scripts, emoji, control tokens inside text, long repeats, edge cases)
with

    tok.encode(text, add_special_tokens=False)

and writes a JSON fixture:

    {
      "source": "<transformers/tokenizers versions, gguf file name and sha256>",
      "note":   "<how the ids were produced, and the backend pipeline transformers built>",
      "cases":  [{"text": "...", "ids": [...], "roundtrip": true}, ...]
    }

`add_special_tokens=False` means no BOS/EOS is added around the text. The GGUF's CONTROL tokens
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ...) are registered by transformers as special
added tokens, so when their text appears *inside* a case string it maps to the single special
token id (llama.cpp's `parse_special = true` behaviour) -- the script asserts this.

`roundtrip` records whether `tok.decode(ids) == text` (decode keeps special tokens and does no
clean-up of tokenization spaces).

The `smollm` pre-tokenizer correction
-------------------------------------
transformers (checked with 5.24) has no entry for `tokenizer.ggml.pre = "smollm"`, so it leaves the
plain GPT-2 `ByteLevel(use_regex=True)` pre-tokenizer in place. llama.cpp (llama-vocab.cpp, the
STARCODER/REFACT/COMMAND_R/SMOLLM/... group) first isolates every `\p{N}` character and then applies
the GPT-2 regex, which is also what the model's own tokenizer.json does with
`Sequence[Digits(individual_digits=True), ByteLevel]`. For ASCII digits the two agree on this
vocabulary (it has no merges that join an ASCII digit to anything), but they differ where a space
precedes a non-ASCII number character (" ½", " ²", Arabic-Indic digits ...): the GPT-2 regex keeps
" ½" in one piece and BPE merges the space into it.

So, by default, when the file says `smollm` and transformers built a bare ByteLevel pre-tokenizer,
this script prepends `Digits(individual_digits=True)` -- the upstream pipeline -- before encoding,
and for every case where that changes the result it also stores transformers' unpatched ids as
`"ids_transformers_as_built"`. `--as-built` turns the correction off (ids are then exactly
transformers' output). The fixture's "source" says which was used.

How to run (from the repository root)
-------------------------------------
    python3 -m venv .venv-fixture && \
    .venv-fixture/bin/pip install transformers gguf sentencepiece protobuf && \
    .venv-fixture/bin/python scripts/make_tokenizer_fixture.py \
        models/SmolLM2-135M-Instruct.Q4_1.gguf tests/fixtures/tokenizer_smollm2.json

Note: transformers 5.x's GGUF reader (`transformers.integrations.gguf.reader`) imports `torch`
at module level, even though building a tokenizer never touches a tensor. If loading fails with
"No module named 'torch'", also `pip install torch` into the same venv.

The fixture is meant to be regenerated only deliberately; check the diff of the JSON when you do.
"""

import argparse
import hashlib
import json
import os
import sys

# Every case string. Keep this list stable: tests compare against it by content, and appending
# is safer than reordering. Python escapes are used for anything invisible or ambiguous.
CASES = [
    # --- plain English -------------------------------------------------------------------
    "Hello, world!",
    "The capital of France is",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "hello",
    "HELLO WORLD",
    "Hello",
    " Hello",
    # --- leading / trailing / runs of whitespace -------------------------------------------
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "a  b",
    "a   b    c",
    "   ",
    "\t",
    "a\tb\t\tc",
    "\n",
    "\n\n\n",
    "line one\nline two\n",
    "windows\r\nline endings\r\n",
    "mixed \t \n  \r\n\t whitespace",
    "ends with newline and spaces\n   ",
    "  \n  indented after newline",
    # --- digits and numbers ----------------------------------------------------------------
    "12345",
    "3.14159",
    "1,000,000",
    "2026-11-26",
    "The year 1999 and 2000.",
    "x = 42; y = -7.5e-3",
    "0x1F 0b1010 007",
    " 7 77 777 7777",
    "Version 2.0.1-beta+build.45",
    # --- punctuation -----------------------------------------------------------------------
    "!!!???...",
    "Wait... what?!",
    "--- *** === ___ ~~~",
    "(a), [b], {c}; <d>: \"e\" 'f'",
    "@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    # --- contractions ----------------------------------------------------------------------
    "don't",
    "I'LL",
    "we've",
    "She's here, they're there, I'm sure it'd work, we'll see.",
    "DON'T STOP, Y'ALL",
    "rock 'n' roll",
    # --- code ------------------------------------------------------------------------------
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n    def __init__(self):\n        self.x = [1, 2, 3]\n\n    def bar(self):\n        pass\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
    "impl<'a> Iterator for Tokens<'a> {\n\ttype Item = &'a str;\n}",
    "{\"name\": \"SmolLM2\", \"params\": 135000000, \"tags\": [\"a\", \"b\"], \"ok\": true}",
    "<!DOCTYPE html>\n<html>\n  <body>\n    <p class=\"x\">Hi &amp; bye</p>\n  </body>\n</html>",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "if (x != null && y <= 0) { return; } // comment",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 1); }",
    # --- unicode: Latin with diacritics, other scripts -------------------------------------
    "café naïve",
    "Größe, Übermaß, Straße und Fußgänger",
    "Ça va? Où est la bibliothèque? àéèêëïîôùûüÿç",
    "¿Qué tal? ¡Muy bien! El niño está en España.",
    "你好，世界",
    "我爱自然语言处理。",
    "こんにちは、世界！カタカナとひらがな",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε αβγδε",
    "שלום עולם",
    "สวัสดีชาวโลก",
    # combining characters: decomposed e + U+0301, n + U+0303, stacked marks
    "e\u0301 n\u0303 a\u0300\u0301\u0302",
    "Z\u0351\u036b\u0343a\u0352l\u0357g\u0315o",
    # --- emoji -----------------------------------------------------------------------------
    "😀",
    "I love 🍕 and 🍣!",
    "👨\u200d👩\u200d👧\u200d👦",
    "🇫🇷🇯🇵🇺🇸",
    "👍🏽 👋🏿 🧑🏻\u200d💻",
    "❤️ ✔️ ☀",
    # --- math / symbols --------------------------------------------------------------------
    "∀x ∈ ℝ: x² ≥ 0",
    "∫₀^∞ e^{-x²} dx = √π / 2",
    "a ≠ b, α + β = γ, ½ + ¼ = ¾",
    "€100 £50 ¥1000 $5.99 ₹20",
    # non-ASCII number characters (\p{N}) after a space: where the smollm digit split matters
    " ½",
    " ²",
    "x² + y³ = z⁴",
    "١٢٣ ٤٥",
    "१२३ ४५",
    "１２３ ４５",
    "①②③ Ⅻ",
    "H₂O and CO₂",
    "→ ← ↑ ↓ ⇒ ⇔ • … — – «quote» “curly” ‘single’",
    # --- URLs, e-mails, paths --------------------------------------------------------------
    "https://example.com/path/to/page?query=1&lang=en#section",
    "Visit http://www.example.org or ftp://files.example.net/pub/file.tar.gz",
    "Contact: john.doe+tag@example.co.uk, admin@localhost",
    "/usr/local/bin/python3 C:\\Users\\Admin\\file.txt",
    # --- control / special tokens inside text ----------------------------------------------
    "<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "before<|endoftext|>after",
    " <|im_end|> ",
    "<|im_start|><|im_end|>",
    "<|im_start|",
    "<repo_name>my/repo<file_sep>main.py",
    # --- long / repeated -------------------------------------------------------------------
    "a" * 300,
    "ab " * 100,
    "=" * 80,
    " " * 50,
    "\n" * 20,
    "the " * 60,
    # --- edge cases ------------------------------------------------------------------------
    "",
    " ",
    "\u200b",
    "zero\u200bwidth\u200bspace",
    "\u00a0",
    "non\u00a0breaking\u00a0space",
    "\ufeffBOM at start",
    "\u3000ideographic space\u3000",
    "soft\u00adhyphen",
    "\x00\x01\x7f",
    "A",
    "'",
    # --- mixed-language sentences ----------------------------------------------------------
    "I said 你好 to my friend in Tokyo (東京) and she replied こんにちは!",
    "The word for 'peace' is 'мир' in Russian and 'سلام' in Arabic.",
    "Mix: English, Deutsch (Ärger), Français (œuvre), 日本語, 한국어, हिन्दी, 123 and 🚀.",
]


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", help="path to the .gguf file whose tokenizer to use")
    parser.add_argument("output", help="where to write the JSON fixture")
    parser.add_argument(
        "--as-built",
        action="store_true",
        help="do not apply the smollm digit-split correction; ids are exactly what transformers builds",
    )
    args = parser.parse_args()

    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    gguf_path = os.path.abspath(args.gguf)
    gguf_dir, gguf_name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    backend = tok.backend_tokenizer
    as_built_pre_tokenizer = str(backend.pre_tokenizer)

    from gguf import GGUFReader

    pre_type = GGUFReader(gguf_path).fields["tokenizer.ggml.pre"].contents()
    # A second, untouched copy, to record where the correction changes anything.
    as_built = None
    correction = "none"
    if pre_type == "smollm" and not args.as_built:
        from tokenizers import pre_tokenizers

        current = json.loads(backend.to_str())["pre_tokenizer"]
        bare_byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        if current == bare_byte_level:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            )
            as_built = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            correction = (
                "pre_tokenizer patched for tokenizer.ggml.pre='smollm': Digits(individual_digits=True) prepended "
                f"to transformers' {as_built_pre_tokenizer} (matches llama.cpp and the model's tokenizer.json)"
            )
        elif "Digits" in json.dumps(current):
            correction = "none needed: transformers already splits digits for smollm"
        else:
            sys.exit(f"unexpected pre-tokenizer for smollm, refusing to guess a correction: {current}")

    # Special (control) tokens written inside the text must come out as their single id.
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tok.encode(special, add_special_tokens=False)
        expected = tok.convert_tokens_to_ids(special)
        if ids != [expected]:
            sys.exit(f"special token {special!r} encoded as {ids}, expected [{expected}]")

    if len(set(CASES)) != len(CASES):
        sys.exit("duplicate case strings in CASES")

    cases = []
    failures = []
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False)
        decoded = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        roundtrip = decoded == text
        if not roundtrip:
            failures.append((text, decoded))
        case = {"text": text, "ids": ids, "roundtrip": roundtrip}
        if as_built is not None:
            unpatched = as_built.encode(text, add_special_tokens=False)
            if unpatched != ids:
                case["ids_transformers_as_built"] = unpatched
        cases.append(case)

    source = (
        f"transformers {transformers.__version__} (tokenizers {tokenizers.__version__}), "
        f"AutoTokenizer.from_pretrained(dir, gguf_file={gguf_name!r}); "
        f"{gguf_name} sha256 {sha256_of(gguf_path)}, tokenizer.ggml.pre={pre_type!r}; correction: {correction}"
    )
    note = (
        "ids = tok.encode(text, add_special_tokens=False): no BOS/EOS added; control tokens such as "
        "<|im_start|> written in the text map to their single special id. "
        "roundtrip = (tok.decode(ids) == text). "
        "ids_transformers_as_built (only where different) = ids from transformers without the correction. "
        f"Backend pipeline used for ids: normalizer={backend.normalizer}; "
        f"pre_tokenizer={backend.pre_tokenizer}; decoder={backend.decoder} "
        f"(transformers as built: pre_tokenizer={as_built_pre_tokenizer}). "
        "Generated by scripts/make_tokenizer_fixture.py; do not edit by hand."
    )

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    # One case per line keeps diffs of a regenerated fixture readable; the result is plain JSON.
    def dumps(value):
        return json.dumps(value, ensure_ascii=False)

    lines = ["{", f' "source": {dumps(source)},', f' "note": {dumps(note)},', ' "cases": [']
    lines += [f"  {dumps(case)}," for case in cases]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" ]", "}"]
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")

    print(f"wrote {len(cases)} cases to {args.output}")
    print(f"correction:    {correction}")
    print(f"normalizer:    {backend.normalizer}")
    print(f"pre_tokenizer: {backend.pre_tokenizer}")
    print(f"decoder:       {backend.decoder}")
    for text, decoded in failures:
        print(f"roundtrip failed: {text!r} -> {decoded!r}")
    for case in cases:
        if "ids_transformers_as_built" in case:
            print(f"correction changed: {case['text']!r}: {case['ids_transformers_as_built']} -> {case['ids']}")


if __name__ == "__main__":
    main()
