//! The GGUF header: our bounds-checked walk, then candle's parser, then the tensor bounds.
//! Any bytes must give a header or a clear error: never a panic, an abort on a huge
//! allocation, or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(content) = edgeinfer::model::gguf::read_content_bytes(data) {
        // An accepted header's tensors all lie inside the input.
        for info in content.tensor_infos.values() {
            assert!(content.tensor_data_offset + info.offset <= data.len() as u64);
        }
    }
});
