//! A bounds-checked walk over a GGUF header before anything is parsed into memory: every
//! count, string length, array length and dimension is checked against what the file can
//! hold, with overflow-safe arithmetic, so a corrupt or hostile file gets a
//! clear error naming the field instead of a panic or a huge allocation in the parser.
//!
//! Knows the GGUF layout (v1 to v3); never what the metadata means. Invariant: it reads
//! sequentially and allocates only key and tensor names (at most 64 KiB each). A key or a
//! tensor named twice is refused (a parser keeps the last; llama.cpp refuses the file), and
//! so are arrays past what any model holds: a parser holds each element in 32 bytes or so,
//! whatever it takes in the file.

use std::io::Read;

/// GGML's limit on tensor dimensions.
const MAX_DIMS: u32 = 4;
const MAX_KEY_BYTES: u64 = 65_535;
/// The most elements of one metadata array, and of all of them: real vocabularies and
/// merge lists hold well under a million each.
const MAX_ARRAY_ELEMS: u64 = 1 << 23;
const MAX_ALL_ARRAY_ELEMS: u64 = 1 << 24;

struct Walk<R> {
    r: R,
    /// Bytes read so far.
    pos: u64,
    len: u64,
    /// v1 files use 32-bit counts and lengths.
    wide: bool,
    /// Elements of the arrays so far.
    elems: u64,
}

impl<R: Read> Walk<R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| format!("the file ends inside {what} (at byte {})", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// A count or length field (32-bit in v1).
    fn count(&mut self, what: &str) -> Result<u64, String> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// A count of items of at least `min_bytes` each must fit in what is left of the file.
    fn fits(&self, n: u64, min_bytes: u64, what: &str) -> Result<(), String> {
        match n.checked_mul(min_bytes) {
            Some(b) if b <= self.left() => Ok(()),
            _ => Err(format!(
                "{what} is {n}, more than the {} bytes left in the file can hold",
                self.left()
            )),
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.left() {
            return Err(format!("{what} ({n} bytes) runs past the end of the file"));
        }
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|e| format!("cannot read {what}: {e}"))?;
        if copied != n {
            return Err(format!("the file ends inside {what}"));
        }
        self.pos += n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<(), String> {
        let n = self.count(what)?;
        self.skip(n, what)
    }

    /// A name's bytes (a key's or a tensor's), at most 64 KiB, trailing NULs dropped as
    /// candle reads them (some writers add them).
    fn name(&mut self, what: &str) -> Result<Vec<u8>, String> {
        let n = self.count(what)?;
        if n > MAX_KEY_BYTES || n > self.left() {
            return Err(format!("{what} claims {n} bytes"));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|_| format!("the file ends inside {what}"))?;
        self.pos += n;
        while b.last() == Some(&0) {
            b.pop();
        }
        Ok(b)
    }

    fn key(&mut self, index: u64) -> Result<String, String> {
        let what = format!("metadata key {index}");
        String::from_utf8(self.name(&what)?).map_err(|_| format!("{what} is not UTF-8"))
    }

    /// Skips one value of GGUF type `ty`; returns it when it is an integer of 32 bits or
    /// fewer (signed ones sign-extended).
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Option<i64>, String> {
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            0 | 1 => {
                let [b] = self.bytes::<1>(what)?;
                return Ok(Some(if ty == 1 { b as i8 as i64 } else { b.into() }));
            }
            2 | 3 => {
                let v = u16::from_le_bytes(self.bytes::<2>(what)?);
                return Ok(Some(if ty == 3 { v as i16 as i64 } else { v.into() }));
            }
            4 => return self.u32(what).map(|v| Some(v.into())),
            5 => return self.u32(what).map(|v| Some((v as i32).into())),
            8 => self.string(what)?,
            9 => {
                if depth > 0 {
                    return Err(format!("{what} nests arrays"));
                }
                let elem = self.u32(what)?;
                let n = self.count(what)?;
                self.elems = self.elems.saturating_add(n);
                if n > MAX_ARRAY_ELEMS || self.elems > MAX_ALL_ARRAY_ELEMS {
                    return Err(format!(
                        "the length of {what} is {n} elements, past the {MAX_ARRAY_ELEMS} a \
                         model's metadata array holds ({MAX_ALL_ARRAY_ELEMS} in all)"
                    ));
                }
                match fixed(elem) {
                    Some(size) => {
                        self.fits(n, size, &format!("the length of {what}"))?;
                        self.skip(n * size, what)?;
                    }
                    None => {
                        // Strings (a length each) or nested arrays (refused).
                        let min = if self.wide { 8 } else { 4 };
                        self.fits(n, min, &format!("the length of {what}"))?;
                        for _ in 0..n {
                            self.value(elem, what, depth + 1)?;
                        }
                    }
                }
            }
            t => match fixed(t) {
                Some(size) => self.skip(size, what)?,
                None => return Err(format!("{what} has unknown value type {t}")),
            },
        }
        Ok(None)
    }
}

/// Bytes per block and values per block of a GGML type (the types GGUF files carry).
fn type_layout(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (4, 1),      // F32
        1 => (2, 1),      // F16
        2 => (18, 32),    // Q4_0
        3 => (20, 32),    // Q4_1
        6 => (22, 32),    // Q5_0
        7 => (24, 32),    // Q5_1
        8 => (34, 32),    // Q8_0
        9 => (36, 32),    // Q8_1
        10 => (84, 256),  // Q2_K
        11 => (110, 256), // Q3_K
        12 => (144, 256), // Q4_K
        13 => (176, 256), // Q5_K
        14 => (210, 256), // Q6_K
        15 => (292, 256), // Q8_K
        24 => (1, 1),     // I8
        25 => (2, 1),     // I16
        26 => (4, 1),     // I32
        27 => (8, 1),     // I64
        28 => (8, 1),     // F64
        30 => (2, 1),     // BF16
        _ => return None,
    })
}

/// Walks the header of a GGUF file of `len` bytes read from `r` (positioned at its start).
/// Returns a reason naming the field when it is malformed.
pub fn check_header(r: impl Read, len: u64) -> Result<(), String> {
    let mut w = Walk {
        r,
        pos: 0,
        len,
        wide: true,
        elems: 0,
    };
    let magic = w.bytes::<4>("the magic")?;
    if &magic != b"GGUF" {
        return Err(format!(
            "it starts with {magic:02x?}, not the GGUF magic \"GGUF\""
        ));
    }
    let version = w.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (known: 1 to 3)"
        ));
    }
    w.wide = version >= 2;
    let n_tensors = w.count("the tensor count")?;
    let n_kv = w.count("the metadata count")?;
    // A key is at least a length and a type; a tensor info at least a name length, a
    // dimension count, a type and an offset.
    w.fits(n_kv, if w.wide { 12 } else { 8 }, "the metadata count")?;
    w.fits(n_tensors, if w.wide { 24 } else { 20 }, "the tensor count")?;
    let mut alignment = 32u64;
    let mut keys = std::collections::HashSet::new();
    for i in 0..n_kv {
        let key = w.key(i)?;
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        let ty = w.u32(&format!("the type of `{key}`"))?;
        let v = w.value(ty, &format!("`{key}`"), 0)?;
        // candle takes the alignment from an 8-, 16- or 32-bit integer (a negative one, or
        // any other type, means the default 32), so exactly those are checked.
        if key == "general.alignment" {
            alignment = match v {
                Some(a) if a < 0 => 32,
                Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= 1 << 20 => a as u64,
                None => 32,
                _ => return Err("`general.alignment` must be a power of two up to 1 MiB".into()),
            };
        }
    }
    let mut names = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let what = format!("tensor info {i}");
        let name = w.name(&format!("the name of {what}"))?;
        if !names.insert(name.clone()) {
            let name = String::from_utf8_lossy(&name);
            return Err(format!("tensor `{name}` appears twice"));
        }
        let n_dims = w.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "{what} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut elems: u64 = 1;
        for _ in 0..n_dims {
            let d = w.count(&what)?;
            // A zero would hide an overflowing product of the others (parsers multiply in
            // their own order); a model has no empty tensors.
            if d == 0 {
                return Err(format!("{what} has a zero dimension"));
            }
            elems = elems
                .checked_mul(d)
                .filter(|&e| e <= len.saturating_mul(8))
                .ok_or_else(|| format!("{what} has dimensions larger than the file could hold"))?;
        }
        let ty = w.u32(&what)?;
        let (block_bytes, block_values) =
            type_layout(ty).ok_or_else(|| format!("{what} has unknown type {ty}"))?;
        if !elems.is_multiple_of(block_values) {
            return Err(format!(
                "{what} has {elems} values, not a multiple of its type's block of {block_values}"
            ));
        }
        let offset = w.u64(&what)?;
        if !offset.is_multiple_of(alignment) {
            return Err(format!(
                "{what}'s offset {offset} is not aligned to {alignment}"
            ));
        }
        // Whether the data lies inside the file is checked after parsing, naming the tensor.
        (elems / block_values)
            .checked_mul(block_bytes)
            .ok_or_else(|| format!("{what}'s size overflows"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal v3 header: `kv` metadata entries written by the caller, one F32 tensor.
    fn file(kv: &[u8], n_kv: u64, dims: &[u64], offset: u64, data: usize) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes());
        f.extend(n_kv.to_le_bytes());
        f.extend(kv);
        f.extend(1u64.to_le_bytes());
        f.push(b'w');
        f.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            f.extend(d.to_le_bytes());
        }
        f.extend(0u32.to_le_bytes()); // F32
        f.extend(offset.to_le_bytes());
        while !f.len().is_multiple_of(32) {
            f.push(0);
        }
        f.extend(vec![0u8; data]);
        f
    }

    fn kv_u32(key: &str, v: u32) -> Vec<u8> {
        let mut b = (key.len() as u64).to_le_bytes().to_vec();
        b.extend(key.as_bytes());
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
        b
    }

    /// A key of any bytes with a one-byte value of type `ty` (0: u8, 1: i8).
    fn kv_byte(key: &[u8], ty: u32, v: u8) -> Vec<u8> {
        let mut b = (key.len() as u64).to_le_bytes().to_vec();
        b.extend(key);
        b.extend(ty.to_le_bytes());
        b.push(v);
        b
    }

    #[test]
    fn the_alignment_is_read_as_candle_reads_it() {
        // Found by fuzzing: a NUL-padded key and a u8 value both reach candle's alignment.
        let e = check(&file(
            &kv_byte(b"general.alignment\0\0", 0, 0),
            1,
            &[8],
            0,
            32,
        ));
        assert!(e.unwrap_err().contains("general.alignment"));
        // A negative one means the default (32), as in candle.
        check(&file(
            &kv_byte(b"general.alignment", 1, 0xff),
            1,
            &[8],
            0,
            32,
        ))
        .unwrap();
        let e = check(&file(&kv_byte(b"general.alignment", 0, 24), 1, &[8], 0, 32));
        assert!(e.unwrap_err().contains("general.alignment"));
        for ok in [
            file(&kv_byte(b"general.alignment\0\0", 0, 0), 1, &[8], 0, 32),
            file(&kv_byte(b"general.alignment", 1, 0xff), 1, &[8], 0, 32),
        ] {
            // Whatever the walk accepts, candle parses without a panic.
            if check(&ok).is_ok() {
                let mut c = std::io::Cursor::new(&ok);
                candle_core::quantized::gguf_file::Content::read(&mut c).unwrap();
            }
        }
    }

    fn check(f: &[u8]) -> Result<(), String> {
        check_header(f, f.len() as u64)
    }

    #[test]
    fn a_well_formed_header_passes() {
        check(&file(&kv_u32("general.alignment", 32), 1, &[4, 2], 0, 32)).unwrap();
    }

    #[test]
    fn malformed_headers_are_named_without_allocating() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"GGUX".to_vec(), "magic"),
            (
                file(&kv_u32("general.alignment", 0), 1, &[8], 0, 32),
                "general.alignment",
            ),
            (
                file(&kv_u32("general.alignment", 24), 1, &[8], 0, 32),
                "general.alignment",
            ),
            (file(&[], 0, &[u64::MAX, 4], 0, 32), "dimensions"),
            (file(&[], 0, &[1 << 40, 1 << 40], 0, 32), "dimensions"),
            // Found by fuzzing: the zero hid a product that overflows in candle's order.
            (
                file(&[], 0, &[0, 1 << 62, 1 << 62], 0, 32),
                "zero dimension",
            ),
            (file(&[], 0, &[8], 3, 64), "not aligned"),
            (file(&[], 0, &[], 0, 32), "dimensions"),
            (file(&[], u64::MAX, &[8], 0, 32), "metadata count"),
        ];
        for (f, needle) in cases {
            let e = check(&f).expect_err(needle);
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // A string or array length far past the end of the file.
        let mut kv = 3u64.to_le_bytes().to_vec();
        kv.extend(b"k.s");
        kv.extend(8u32.to_le_bytes());
        kv.extend((1u64 << 62).to_le_bytes());
        let e = check(&file(&kv, 1, &[8], 0, 32)).unwrap_err();
        assert!(e.contains("`k.s`"), "{e}");
        let mut kv = 3u64.to_le_bytes().to_vec();
        kv.extend(b"k.a");
        kv.extend(9u32.to_le_bytes());
        kv.extend(8u32.to_le_bytes()); // array of strings
        kv.extend((1u64 << 62).to_le_bytes());
        let e = check(&file(&kv, 1, &[8], 0, 32)).unwrap_err();
        assert!(e.contains("length of `k.a`"), "{e}");
        // Truncation anywhere in the header is an error, never a panic.
        let kv = kv_u32("general.alignment", 32);
        let good = file(&kv, 1, &[4, 2], 0, 32);
        let header = 24 + kv.len() + 9 + 4 + 16 + 4 + 8;
        check(&good[..header]).expect("the whole header without data passes this check");
        for cut in 0..header {
            assert!(check(&good[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn names_given_twice_and_arrays_past_any_models_are_refused() {
        // A key twice (a parser would keep the last).
        let mut kv = kv_u32("llama.block_count", 2);
        kv.extend(kv_u32("llama.block_count", 30));
        let e = check(&file(&kv, 2, &[8], 0, 32)).unwrap_err();
        assert!(e.contains("`llama.block_count` appears twice"), "{e}");
        // A tensor twice: `w` then `w` again, both at offset 0.
        let one = file(&[], 0, &[8], 0, 32);
        let info = &one[24..24 + 8 + 1 + 4 + 8 + 4 + 8];
        let mut f = one[..24].to_vec();
        f[8..16].copy_from_slice(&2u64.to_le_bytes());
        f.extend(info);
        f.extend(info);
        while !f.len().is_multiple_of(32) {
            f.push(0);
        }
        f.extend([0u8; 32]);
        let e = check(&f).unwrap_err();
        assert!(e.contains("tensor `w` appears twice"), "{e}");
        // 2^24 one-byte elements the file does hold (a parser would take 32 bytes each).
        let n = 1u64 << 24;
        let mut kv = 3u64.to_le_bytes().to_vec();
        kv.extend(b"k.a");
        kv.extend(9u32.to_le_bytes());
        kv.extend(0u32.to_le_bytes()); // array of u8
        kv.extend(n.to_le_bytes());
        kv.extend(vec![0u8; n as usize]);
        let e = check(&file(&kv, 1, &[8], 0, 32)).unwrap_err();
        assert!(
            e.contains("length of `k.a`") && e.contains("elements"),
            "{e}"
        );
        // A real vocabulary's size passes.
        let n = 200_000u64;
        let mut kv = 3u64.to_le_bytes().to_vec();
        kv.extend(b"k.a");
        kv.extend(9u32.to_le_bytes());
        kv.extend(5u32.to_le_bytes()); // array of i32
        kv.extend(n.to_le_bytes());
        kv.extend(vec![0u8; 4 * n as usize]);
        check(&file(&kv, 1, &[8], 0, 32)).unwrap();
    }
}
