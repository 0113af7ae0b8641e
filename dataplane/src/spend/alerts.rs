//! Budget alerts: what happens when an instance's spend crosses one of its budget's alert thresholds.
//!
//! Owns: [`fire`], called by the owning core ([`crate::spend::shard`]) with each [`AlertEvent`] its ledger
//! reports on a settlement or a slice report: one `budget_alert` access-log event, and, when the budget has
//! a webhook, the same JSON body queued for the webhook thread ([`crate::obs::webhook`]), which POSTs it off
//! the cores.
//!
//! Fails: a full webhook queue drops the call (the webhook thread counts and reports drops); the log event
//! is still written. Cost: nothing per request; per threshold crossed (each fires once per window and
//! instance, see [`tollgate_core::budget::owner`]), one JSON value and one `try_send`.

use tollgate_core::budget::owner::AlertEvent;

use crate::obs::accesslog::Logger;
use crate::obs::webhook::{Webhook, WebhookSender};

/// Logs alert `a` and queues its webhook, if its budget has one and `webhooks` is there.
pub fn fire(log: &Logger, webhooks: Option<&WebhookSender>, a: &AlertEvent) {
    let body = serde_json::json!({
        "ts": crate::obs::accesslog::now_rfc3339(),
        "event": "budget_alert",
        "budget": &*a.budget,
        "instance": a.label,
        "threshold_percent": a.threshold,
        "spent_usd": a.spent.usd(),
        "limit_usd": a.limit.usd(),
        "window_start": a.window_start.to_string(),
    });
    log.value(body.clone());
    if let (Some(url), Some(w)) = (&a.webhook, webhooks) {
        // A full queue drops the call; the webhook thread counts and reports drops.
        let _ = w.try_send(Webhook {
            url: url.clone(),
            body,
        });
    }
}
