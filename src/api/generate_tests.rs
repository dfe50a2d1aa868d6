//! Tests of the request path's helpers: where tool calls open, and a granted budget shared.

use super::{calls_open, share, Aside, Reasoning, ToolFormat};
use crate::structured::reasoning::{Shown, ThinkSyntax};

fn thinks(syntax: ThinkSyntax, opened: bool) -> Option<Reasoning> {
    let shown = Shown::Apart;
    Some(Reasoning {
        syntax,
        opened,
        shown,
    })
}

#[test]
fn calls_open_where_the_format_says_after_the_thinking() {
    let end = calls_open(ToolFormat::HERMES, &thinks(ThinkSyntax::TAGS, true));
    assert_eq!((end.text.as_str(), end.anywhere), ("<tool_call>", true));
    let aside = Aside {
        open: "<think>".into(),
        close: "</think>".into(),
        inside: true,
    };
    assert_eq!(end.aside, Some(aside));
    let end = calls_open(
        ToolFormat::LLAMA3_JSON,
        &thinks(ThinkSyntax::MISTRAL, false),
    );
    assert_eq!((end.text.as_str(), end.anywhere), ("{", false));
    let aside = end.aside.expect("thinking");
    assert_eq!(
        (aside.open.as_str(), aside.close.as_str()),
        ("[THINK]", "[/THINK]")
    );
    assert!(!aside.inside);
    assert_eq!(calls_open(ToolFormat::HERMES, &None).aside, None);
}

#[test]
fn a_short_grant_is_shared_and_fully_used() {
    let mut b = [10, 10, 10];
    share(&mut b, 7);
    assert_eq!(b, [3, 2, 2]);
    let mut b = [6, 2];
    share(&mut b, 4);
    assert_eq!(b, [3, 1]);
    let mut b = [5, 5];
    share(&mut b, 50);
    assert_eq!(b, [5, 5]);
}
