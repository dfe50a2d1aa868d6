//! DRY ("don't repeat yourself"), llama.cpp's sequence-repetition penalty: a child of
//! [`super`], over its candidates.

use std::collections::HashMap;

use super::{Cands, DryParams};

/// DRY over the last `last_n` tokens (see [`DryParams`]): for each earlier place where the
/// sequence's latest tokens also stand (as far back as the last breaker allows), the token
/// that followed them there is penalised by the length of that repetition.
pub(super) fn dry(d: &DryParams, cands: &mut Cands, history: &[u32]) {
    if d.multiplier == 0.0 || d.base < 1.0 {
        return;
    }
    let n = d.last_n.map_or(history.len(), |n| n.min(history.len()));
    if n == 0 || n <= d.allowed_length {
        return;
    }
    // Newest first.
    let rev: Vec<u32> = history[history.len() - n..].iter().rev().copied().collect();
    let tails = |head: u32| {
        let from = d.breakers.partition_point(|(h, _)| *h < head);
        d.breakers[from..]
            .iter()
            .take_while(move |(h, _)| *h == head)
    };
    // The latest breaker bounds how far back a repetition can reach: it counts only the
    // tokens after it.
    let mut limit = n;
    for (i, &t) in rev.iter().enumerate() {
        let longest = tails(t)
            .map(|(_, tail)| tail)
            .filter(|tail| tail.len() <= i && (0..tail.len()).all(|o| tail[o] == rev[i - o - 1]))
            .map(Vec::len)
            .max();
        if let Some(len) = longest {
            limit = i - len;
            break;
        }
    }
    if limit < d.allowed_length {
        return;
    }
    // z[k]: how many of the newest tokens also stand, in order, ending k tokens back.
    let z = z_array(&rev);
    let mut longest: HashMap<u32, usize> = HashMap::new();
    for (k, &zk) in z.iter().enumerate().skip(1) {
        let len = zk.min(limit);
        if len >= d.allowed_length {
            // The token that followed that earlier occurrence.
            let next = rev[k - 1];
            let e = longest.entry(next).or_insert(0);
            *e = (*e).max(len);
        }
    }
    if longest.is_empty() {
        return;
    }
    // `base^exponent` stays finite.
    let max_exp = if d.base > 1.000_001 {
        (88.722_84 / d.base.ln()) as usize
    } else {
        0
    };
    for c in &mut cands.c {
        let Some(&len) = longest.get(&c.id) else {
            continue;
        };
        // A breaker token on its own is never penalised.
        if tails(c.id).any(|(_, tail)| tail.is_empty()) {
            continue;
        }
        let mut exp = len - d.allowed_length;
        if max_exp > 0 {
            exp = exp.min(max_exp);
        }
        c.logit -= d.multiplier * d.base.powi(exp as i32);
    }
    cands.sorted = false;
}

/// The Z-array: `z[k]` is the length of the longest common prefix of `s` and `s[k..]`
/// (`z[0]` is `s.len()`).
pub(super) fn z_array(s: &[u32]) -> Vec<usize> {
    let n = s.len();
    let mut z = vec![0; n];
    if n == 0 {
        return z;
    }
    z[0] = n;
    let (mut l, mut r) = (0, 0);
    for k in 1..n {
        let mut len = if k < r { z[k - l].min(r - k) } else { 0 };
        while k + len < n && s[len] == s[k + len] {
            len += 1;
        }
        if k + len > r {
            l = k;
            r = k + len;
        }
        z[k] = len;
    }
    z
}
