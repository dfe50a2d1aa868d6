//! The SSE encoder: any token texts (newlines, `data:` lookalikes, NULs, broken tool-call
//! markup, reasoning markers) become well-framed events whose payloads are JSON, ending in
//! `[DONE]`; with no parser the content deltas add up to the texts exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parsed = mode & (1 | 4) != 0;
    let texts: Vec<String> = rest
        .split(|&b| b == 0xff)
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect();
    let body = edgeinfer::api::fuzz::sse_body(&texts, mode);
    let events =
        edgeinfer::api::fuzz::sse_payloads(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    if !parsed {
        let content: String = events
            .iter()
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, texts.concat());
    }
});
