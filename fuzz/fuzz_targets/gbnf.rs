//! llama.cpp's GBNF grammars, as requests send them: any text is refused with a message or
//! written as Lark that llguidance's compiler reads, never a panic, an abort or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = edgeinfer::structured::fuzz_gbnf(&text) {
        panic!("{e}");
    }
});
