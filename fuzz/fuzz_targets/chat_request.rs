//! The chat route's request path: JSON bytes -> typed request -> validation of every field
//! -> the chat template. Any body gives a prompt or a 4xx, never a panic or a 5xx.
#![no_main]

use std::sync::OnceLock;

use edgeinfer::model::ChatTemplate;
use libfuzzer_sys::fuzz_target;

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    // ChatML, the default model's template.
    T.get_or_init(|| {
        ChatTemplate::new(ChatTemplate::fallback_source(|_| true), "", "<|im_end|>").unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Err(e) = edgeinfer::api::fuzz::chat_request(data, template()) {
        assert!(e.status.is_client_error(), "{} {}", e.status, e.message);
    }
});
