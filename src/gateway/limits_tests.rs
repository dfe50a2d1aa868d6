//! Limits tests: token and request windows, parallel caps, money budgets. No server.
use super::*;

fn ask(prompt: u64, max: u64, explicit: bool) -> Ask {
    Ask {
        prompt,
        max_tokens: max,
        explicit,
        price: Price::default(),
        sequences: 1,
    }
}

/// 1 micro-USD per token, in and out (cached responses free).
fn micro_per_token() -> Price {
    Price {
        input: 1_000_000,
        cached_input: 1_000_000,
        output: 1_000_000,
        cached_response: 0,
    }
}

fn spec(tpm: Option<u64>, rpm: Option<u64>) -> LimitSpec {
    LimitSpec {
        tpm,
        rpm,
        ..LimitSpec::default()
    }
}

#[test]
fn reservations_never_exceed_the_window() {
    let mut l = Limits::new(None, None);
    let s = spec(Some(1000), None);
    let t0 = Instant::now();
    let mut granted = 0;
    for _ in 0..50 {
        if l.admit(Some(("k", &s)), ask(40, 100, true), t0, 0, |_| Some(0))
            .is_ok()
        {
            granted += 1;
        }
    }
    assert_eq!(granted, 7, "7 x 140 = 980 <= 1000 < 8 x 140");
    // The next one waits for (140 - 20) tokens at 1000/60 per second.
    match l.admit(Some(("k", &s)), ask(40, 100, true), t0, 0, |_| Some(0)) {
        Err(Refusal::Tokens {
            retry_after: Some(d),
            ..
        }) => assert!((d.as_secs_f64() - 7.2).abs() < 0.01, "{d:?}"),
        other => panic!("{other:?}"),
    }
    // After that wait it fits.
    let later = t0 + Duration::from_secs_f64(7.21);
    assert!(l
        .admit(Some(("k", &s)), ask(40, 100, true), later, 0, |_| Some(0))
        .is_ok());
}

#[test]
fn unused_tokens_come_back_and_a_request_too_large_never_fits() {
    let mut l = Limits::new(None, None);
    let s = spec(Some(300), Some(2));
    let t0 = Instant::now();
    let g = l
        .admit(Some(("k", &s)), ask(100, 200, true), t0, 0, |_| Some(0))
        .unwrap();
    assert!(l
        .admit(Some(("k", &s)), ask(10, 10, true), t0, 0, |_| Some(0))
        .is_err());
    l.settle(&g, Some((110, 0)), t0);
    let info = l.rate_info(Some("k"), t0);
    assert_eq!(info.tokens.map(|t| t.1), Some(190));
    assert_eq!(info.requests.map(|t| t.1), Some(1));
    assert!(matches!(
        l.admit(Some(("k", &s)), ask(100, 250, true), t0, 0, |_| Some(0)),
        Err(Refusal::Tokens {
            retry_after: None,
            ..
        })
    ));
    let g = l
        .admit(Some(("k", &s)), ask(10, 10, true), t0, 0, |_| Some(0))
        .unwrap();
    // Requests per minute: both used.
    assert!(matches!(
        l.admit(Some(("k", &s)), ask(1, 1, true), t0, 0, |_| Some(0)),
        Err(Refusal::Requests { .. })
    ));
    // A request that never ran gives its slot back.
    l.settle(&g, None, t0);
    assert!(l
        .admit(Some(("k", &s)), ask(1, 1, true), t0, 0, |_| Some(0))
        .is_ok());
}

#[test]
fn without_max_tokens_the_completion_is_clamped_to_what_fits() {
    let mut l = Limits::new(Some(500), None);
    let t0 = Instant::now();
    let g = l
        .admit(None, ask(100, 2000, false), t0, 0, |_| Some(0))
        .unwrap();
    assert_eq!(g.max_tokens, 400);
    assert!(matches!(
        l.admit(None, ask(1, 2000, false), t0, 0, |_| Some(0)),
        Err(Refusal::Tokens {
            scope: Scope::Global,
            ..
        })
    ));
}

#[test]
fn budgets_reserve_the_most_a_request_can_cost() {
    let mut l = Limits::new(None, None);
    let s = LimitSpec {
        max_budget_micros: Some(100),
        budget_duration_secs: Some(3600),
        created: 1000,
        ..LimitSpec::default()
    };
    // 1 micro-USD per token each way.
    let price = micro_per_token();
    let a = |max, explicit| Ask {
        prompt: 10,
        max_tokens: max,
        explicit,
        price,
        sequences: 1,
    };
    let t0 = Instant::now();
    // 30 already spent this period: 70 left.
    let g = l.admit(Some(("k", &s)), a(50, true), t0, 2000, |start| {
        assert_eq!(start, 1000);
        Some(30)
    });
    let g = g.unwrap();
    // 10 left after reserving 60: a request of 10 + 1 cannot fit now, but would when that
    // one ends, so it is asked to retry (the budget is not spent).
    assert!(matches!(
        l.admit(Some(("k", &s)), a(1, true), t0, 2000, |_| Some(0)),
        Err(Refusal::BudgetHeld { budget_micros: 100 })
    ));
    // One that could not fit even then is told the budget is spent, and when it resets.
    assert!(matches!(
        l.admit(Some(("k", &s)), a(61, true), t0, 2000, |_| Some(0)),
        Err(Refusal::Budget { retry_after: Some(d), .. }) if d == Duration::from_secs(2600)
    ));
    l.settle(&g, Some((15, 15)), t0);
    assert_eq!(l.spend("k", 1000), Some(45));
    assert_eq!(l.spend("k", 4600), None);
    // Without max_tokens, the completion is clamped to the budget: 55 - 10 = 45.
    let g = l
        .admit(Some(("k", &s)), a(1000, false), t0, 2000, |_| Some(0))
        .unwrap();
    assert_eq!(g.max_tokens, 45);
    l.settle(&g, None, t0);
    // A new period's spend is the ledger's: a request admitted in the last one that ended in
    // this one is billed here.
    let g = l
        .admit(Some(("k", &s)), a(1, true), t0, 4700, |start| {
            assert_eq!(start, 4600);
            Some(20)
        })
        .unwrap();
    l.settle(&g, Some((11, 11)), t0);
    assert_eq!(l.spend("k", 4600), Some(31));
    // A spend that cannot be read is read again at the next admission; until then it is
    // what this process counted in the period (nothing in a new one, then what settled).
    let g = l
        .admit(Some(("k", &s)), a(1000, false), t0, 8300, |_| None)
        .unwrap();
    assert_eq!(g.max_tokens, 90);
    assert_eq!(l.spend("k", 8200), None);
    l.settle(&g, Some((30, 30)), t0);
    let g = l
        .admit(Some(("k", &s)), a(1000, false), t0, 8300, |_| None)
        .unwrap();
    assert_eq!(g.max_tokens, 60);
    l.settle(&g, None, t0);
    // A read that lags what was counted (a row still on its way) counts no less.
    let g = l
        .admit(Some(("k", &s)), a(1000, false), t0, 8300, |_| Some(20))
        .unwrap();
    assert_eq!(g.max_tokens, 60);
    assert_eq!(l.spend("k", 8200), Some(30));
}

#[test]
fn parallel_requests_are_capped() {
    let mut l = Limits::new(None, None);
    let s = LimitSpec {
        max_parallel: Some(1),
        ..LimitSpec::default()
    };
    let t0 = Instant::now();
    let g = l
        .admit(Some(("k", &s)), ask(1, 1, true), t0, 0, |_| Some(0))
        .unwrap();
    assert_eq!(
        l.admit(Some(("k", &s)), ask(1, 1, true), t0, 0, |_| Some(0)),
        Err(Refusal::Parallel { limit: 1 })
    );
    l.settle(&g, Some((2, 0)), t0);
    assert!(l
        .admit(Some(("k", &s)), ask(1, 1, true), t0, 0, |_| Some(0))
        .is_ok());
}

#[test]
fn each_choice_holds_a_parallel_slot() {
    let mut l = Limits::new(None, None);
    let s = LimitSpec {
        max_parallel: Some(3),
        ..LimitSpec::default()
    };
    let t0 = Instant::now();
    let choices = |n| Ask {
        sequences: n,
        ..ask(1, 1, true)
    };
    let two = l
        .admit(Some(("k", &s)), choices(2), t0, 0, |_| Some(0))
        .unwrap();
    assert_eq!(
        l.admit(Some(("k", &s)), choices(2), t0, 0, |_| Some(0)),
        Err(Refusal::Parallel { limit: 3 })
    );
    let one = l
        .admit(Some(("k", &s)), choices(1), t0, 0, |_| Some(0))
        .unwrap();
    // Settling gives back every slot a request held.
    l.settle(&two, Some((2, 0)), t0);
    assert!(l
        .admit(Some(("k", &s)), choices(2), t0, 0, |_| Some(0))
        .is_ok());
    l.settle(&one, None, t0);
    assert!(l
        .admit(Some(("k", &s)), choices(1), t0, 0, |_| Some(0))
        .is_ok());
}

#[test]
fn cache_hits_pay_from_the_budget_and_are_refused_once_it_is_spent() {
    let mut l = Limits::new(Some(10), Some(1));
    let s = LimitSpec {
        max_budget_micros: Some(100),
        budget_duration_secs: Some(3600),
        created: 1000,
        ..LimitSpec::default()
    };
    // 90 spent: a hit costing 10 fits and is charged; the global windows are not touched.
    assert_eq!(
        l.admit_cached(Some(("k", &s)), 10, 2000, |_| Some(90)),
        Ok(())
    );
    assert_eq!(l.spend("k", 1000), Some(100));
    assert!(l
        .admit(None, ask(1, 1, true), Instant::now(), 2000, |_| Some(0))
        .is_ok());
    // Spent: even a free hit is refused, until the period resets.
    assert!(matches!(
        l.admit_cached(Some(("k", &s)), 0, 2000, |_| Some(0)),
        Err(Refusal::Budget { retry_after: Some(d), .. }) if d == Duration::from_secs(2600)
    ));
    assert_eq!(
        l.admit_cached(Some(("k", &s)), 0, 4700, |_| Some(0)),
        Ok(())
    );
    // A hit that costs more than is left is refused and charges nothing.
    assert!(l
        .admit_cached(Some(("k", &s)), 101, 4700, |_| Some(0))
        .is_err());
    assert_eq!(l.spend("k", 4600), Some(0));
    // A budget reserved by a running request leaves nothing for a hit.
    let price = Price {
        output: 1_000_000,
        ..Price::default()
    };
    let full = Ask {
        prompt: 0,
        max_tokens: 100,
        explicit: true,
        price,
        sequences: 1,
    };
    let mut l = Limits::new(None, None);
    let g = l
        .admit(Some(("k", &s)), full, Instant::now(), 2000, |_| Some(0))
        .unwrap();
    assert!(l
        .admit_cached(Some(("k", &s)), 0, 2000, |_| Some(0))
        .is_err());
    l.settle(&g, Some((10, 10)), Instant::now());
    assert_eq!(
        l.admit_cached(Some(("k", &s)), 0, 2000, |_| Some(0)),
        Ok(())
    );
    // Without a key or a budget, hits are always admitted.
    assert_eq!(l.admit_cached(None, 5, 2000, |_| Some(0)), Ok(()));
    let free = LimitSpec::default();
    assert_eq!(
        l.admit_cached(Some(("f", &free)), 5, 2000, |_| Some(0)),
        Ok(())
    );
}

#[test]
fn a_prompt_only_request_needs_room_for_its_prompt_only() {
    let mut l = Limits::new(None, None);
    // Embeddings: 40 prompt tokens, no completion (explicitly).
    let s = LimitSpec {
        tpm: Some(40),
        max_budget_micros: Some(40),
        budget_duration_secs: Some(3600),
        created: 1000,
        ..LimitSpec::default()
    };
    let price = micro_per_token();
    let a = |prompt| Ask {
        prompt,
        max_tokens: 0,
        explicit: true,
        price,
        sequences: 1,
    };
    let t0 = Instant::now();
    // Exactly the window and exactly the budget: it fits (it was refused for want of a
    // completion token that it never asks for).
    let g = l
        .admit(Some(("k", &s)), a(40), t0, 2000, |_| Some(0))
        .unwrap();
    assert_eq!(g.max_tokens, 0);
    // Nothing left of either: refused.
    assert!(l
        .admit(Some(("k", &s)), a(1), t0, 2000, |_| Some(0))
        .is_err());
    l.settle(&g, None, t0);
}

#[test]
fn a_refund_takes_back_what_was_counted_in_the_current_period_only() {
    let mut l = Limits::new(None, None);
    let s = LimitSpec {
        max_budget_micros: Some(100),
        budget_duration_secs: Some(3600),
        created: 1000,
        ..LimitSpec::default()
    };
    // Nothing held for the key yet: nothing to take back (its spend is read when needed),
    // and the spend is to be read, for the period an admission at 2000 falls in.
    assert_eq!(l.loaded_period("k"), None);
    assert_eq!(l.spend_to_read("k", &s, 2000), Some(1000));
    l.refund("k", 1000, 30);
    assert_eq!(
        l.admit_cached(Some(("k", &s)), 10, 2000, |_| Some(90)),
        Ok(())
    );
    assert_eq!(l.loaded_period("k"), Some(1000));
    assert_eq!(l.spend_to_read("k", &s, 2000), None);
    // The next period's is read anew.
    assert_eq!(l.spend_to_read("k", &s, 4700), Some(4600));
    // A line's superseded attempt cost 30 in the period that started at 1000.
    l.refund("k", 1000, 30);
    assert_eq!(l.spend("k", 1000), Some(70));
    // Not for another period than the one held.
    l.refund("k", 4600, 30);
    assert_eq!(l.spend("k", 1000), Some(70));
    // Never below nothing.
    l.refund("k", 1000, 500);
    assert_eq!(l.spend("k", 1000), Some(0));
}
