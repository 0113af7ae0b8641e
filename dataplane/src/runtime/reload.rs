//! Which settings a reload cannot apply: they are read once, when the workers, listeners, resolver, log
//! writer, ledger and identity thread start. `Gateway::reload` applies everything else and reports these
//! by name (`reload_restart_required`), keeping their running values.
//!
//! Owns: [`RESTART_REQUIRED`], one table of (setting name, how to tell it changed), so a name can never be
//! paired with another setting's check. Fails: never. Cost: a few comparisons per reload, control side only.

use tollgate_core::Config;

/// A setting read only at start.
#[derive(Debug, Clone, Copy)]
pub struct StartOnly {
    /// As written in the configuration file.
    pub name: &'static str,
    /// Whether the setting differs between the running configuration and a new one.
    pub changed: fn(&Config, &Config) -> bool,
}

macro_rules! start_only {
    ($name:literal, $($field:ident).+) => {
        StartOnly {
            name: $name,
            changed: |old: &Config, new: &Config| old.$($field).+ != new.$($field).+,
        }
    };
}

/// Every setting a reload leaves as it runs, each with its own check.
pub const RESTART_REQUIRED: &[StartOnly] = &[
    start_only!("server.listen", server.listen),
    start_only!("server.workers", server.workers),
    start_only!("server.pin_workers", server.pin_workers),
    start_only!("server.driver", server.driver),
    start_only!("server.max_head_bytes", server.max_head_bytes),
    start_only!("server.max_headers", server.max_headers),
    start_only!("server.max_body_bytes", server.max_body_bytes),
    start_only!("server.header_timeout_ms", server.header_timeout),
    start_only!("server.body_timeout_ms", server.body_timeout),
    start_only!("server.idle_timeout_ms", server.idle_timeout),
    start_only!("server.shutdown_grace_ms", server.shutdown_grace),
    start_only!("server.handoff", server.handoff),
    start_only!("server.budget_slices", server.budget_slices),
    start_only!("upstream.connect_timeout_ms", upstream.connect_timeout),
    start_only!(
        "upstream.first_byte_timeout_ms",
        upstream.first_byte_timeout
    ),
    start_only!("upstream.read_timeout_ms", upstream.read_timeout),
    start_only!("upstream.pool_idle_timeout_ms", upstream.pool_idle_timeout),
    start_only!(
        "upstream.pool_max_idle_per_provider",
        upstream.pool_max_idle_per_provider
    ),
    start_only!("upstream.dns_refresh_ms", upstream.dns_refresh),
    start_only!("log.access_log", log.access_log),
    start_only!("store.dir", store.dir),
    start_only!("ledger.dir", ledger.dir),
    start_only!("ledger.commit_interval_ms", ledger.commit_interval),
    start_only!("ledger.fail_closed_after_ms", ledger.fail_closed_after),
    StartOnly {
        name: "ledger.cluster_file",
        changed: |old, new| old.ledger.store.cluster_file() != new.ledger.store.cluster_file(),
    },
    StartOnly {
        name: "ledger.shared_file",
        changed: |old, new| old.ledger.store.shared_file() != new.ledger.store.shared_file(),
    },
    StartOnly {
        name: "ledger.postgres",
        // The URL as written, password included.
        changed: |old, new| match (old.ledger.store.postgres(), new.ledger.store.postgres()) {
            (Some(o), Some(n)) => !o.same_url(n),
            (o, n) => o.is_some() != n.is_some(),
        },
    },
    StartOnly {
        name: "ledger.postgres_ca_file",
        changed: |old, new| match (old.ledger.store.postgres(), new.ledger.store.postgres()) {
            (Some(o), Some(n)) => o.ca_file != n.ca_file,
            _ => false,
        },
    },
    StartOnly {
        name: "ledger.postgres_timeout_ms",
        changed: |old, new| match (old.ledger.store.postgres(), new.ledger.store.postgres()) {
            (Some(o), Some(n)) => o.timeout != n.timeout,
            _ => false,
        },
    },
    start_only!("ledger.node_id", ledger.fleet.node_id),
    start_only!("ledger.fleet_nodes", ledger.fleet.nodes),
    start_only!("ledger.lease_ttl_ms", ledger.fleet.lease_ttl_ms),
    start_only!("ledger.max_skew_ms", ledger.fleet.max_skew_ms),
    start_only!("ledger.clock_offset_ms", ledger.fleet.clock_offset_ms),
    start_only!("auth.demo_token", auth.demo_token),
    start_only!("admin.listen", admin.listen),
    start_only!("admin.enabled", admin.enabled),
    start_only!("admin.roles", admin.roles),
];

/// Which of [`RESTART_REQUIRED`] differ between the running configuration and a new one.
pub fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    RESTART_REQUIRED
        .iter()
        .filter(|s| (s.changed)(old, new))
        .map(|s| s.name)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::path::Path;

    use super::*;

    /// A configuration that sets none of the start-only settings (all defaults).
    const BASE: &str = r#"
[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:9"
api_key_env = "TOLLGATE_TEST_NO_SUCH_KEY"

[[routes]]
model = "gpt-*"
provider = "openai"
"#;

    /// For each start-only setting, the file text that changes it alone (written as a user would).
    const ONE_CHANGE: &[(&str, &str)] = &[
        ("server.listen", "[server]\nlisten = [\"127.0.0.1:1\"]\n"),
        ("server.workers", "[server]\nworkers = 3\n"),
        ("server.pin_workers", "[server]\npin_workers = false\n"),
        ("server.driver", "[server]\ndriver = \"epoll\"\n"),
        ("server.max_head_bytes", "[server]\nmax_head_bytes = 12345\n"),
        ("server.max_headers", "[server]\nmax_headers = 17\n"),
        ("server.max_body_bytes", "[server]\nmax_body_bytes = 123456\n"),
        ("server.header_timeout_ms", "[server]\nheader_timeout_ms = 1234\n"),
        ("server.body_timeout_ms", "[server]\nbody_timeout_ms = 1234\n"),
        ("server.idle_timeout_ms", "[server]\nidle_timeout_ms = 1234\n"),
        ("server.shutdown_grace_ms", "[server]\nshutdown_grace_ms = 1234\n"),
        ("server.handoff", "[server]\nhandoff = false\n"),
        ("server.budget_slices", "[server]\nbudget_slices = false\n"),
        ("upstream.connect_timeout_ms", "[upstream]\nconnect_timeout_ms = 1234\n"),
        ("upstream.first_byte_timeout_ms", "[upstream]\nfirst_byte_timeout_ms = 1234\n"),
        ("upstream.read_timeout_ms", "[upstream]\nread_timeout_ms = 1234\n"),
        ("upstream.pool_idle_timeout_ms", "[upstream]\npool_idle_timeout_ms = 1234\n"),
        ("upstream.pool_max_idle_per_provider", "[upstream]\npool_max_idle_per_provider = 7\n"),
        ("upstream.dns_refresh_ms", "[upstream]\ndns_refresh_ms = 1234\n"),
        ("log.access_log", "[log]\naccess_log = false\n"),
        // The ledger's directory defaults to `ledger` under the store's: kept where it was, so the store's
        // directory is the only thing that moves.
        (
            "store.dir",
            "[store]\ndir = \"/tmp/tg-elsewhere\"\n[ledger]\ndir = \"/tmp/tg-reload-table/ledger\"\n",
        ),
        ("ledger.dir", "[ledger]\ndir = \"/tmp/tg-other-ledger\"\n"),
        ("ledger.commit_interval_ms", "[ledger]\ncommit_interval_ms = 77\n"),
        ("ledger.fail_closed_after_ms", "[ledger]\nfail_closed_after_ms = 7777\n"),
        ("ledger.shared_file", "[ledger]\nshared_file = \"/tmp/tg-fleet.sqlite\"\n"),
        ("ledger.postgres", "[ledger]\npostgres = \"postgres://tg:pw@db/spend\"\n"),
        ("ledger.node_id", "[ledger]\nnode_id = 7\n"),
        ("ledger.fleet_nodes", "[ledger]\nfleet_nodes = 7\n"),
        ("ledger.lease_ttl_ms", "[ledger]\nlease_ttl_ms = 7777\n"),
        ("ledger.max_skew_ms", "[ledger]\nmax_skew_ms = 777\n"),
        ("ledger.clock_offset_ms", "[ledger]\nclock_offset_ms = -77\n"),
        ("auth.demo_token", "[auth]\ndemo_token = true\nallow_anonymous = true\n"),
        ("admin.listen", "[admin]\nlisten = \"127.0.0.1:1\"\n"),
        ("admin.enabled", "[admin]\nenabled = false\n"),
        ("admin.roles", "[admin]\nroles = { viewer = [\"*\"] }\n"),
    ];

    fn config(extra: &str) -> Config {
        let text = format!("[store]\ndir = \"/tmp/tg-reload-table\"\n{extra}{BASE}");
        // `[store]` appears once: a change of store.dir replaces the base's.
        let text = if extra.contains("[store]") {
            format!("{extra}{BASE}")
        } else {
            text
        };
        Config::parse(Path::new("reload.toml"), &text)
            .unwrap_or_else(|e| panic!("{extra:?} does not parse: {e}"))
    }

    #[test]
    fn each_start_only_setting_changed_alone_is_reported_by_its_own_name() {
        let base = config("");
        assert_eq!(restart_required(&base, &base), Vec::<&str>::new());
        for (name, change) in ONE_CHANGE {
            let changed = config(change);
            assert_eq!(
                restart_required(&base, &changed),
                vec![*name],
                "changing only {name} ({change:?})"
            );
        }
    }

    #[test]
    fn the_postgres_settings_changed_alone_are_reported_by_their_own_names() {
        let pg = "[ledger]\npostgres = \"postgres://tg:pw@db/spend\"\n";
        let base = config(pg);
        let timeout = config(&format!("{pg}postgres_timeout_ms = 777\n"));
        assert_eq!(
            restart_required(&base, &timeout),
            vec!["ledger.postgres_timeout_ms"]
        );
        // Only the password changed: still a restart (the running pool logged in with the old one).
        let password = config("[ledger]\npostgres = \"postgres://tg:other@db/spend\"\n");
        assert_eq!(restart_required(&base, &password), vec!["ledger.postgres"]);
    }

    #[test]
    fn every_table_entry_is_tested() {
        let tested: Vec<&str> = ONE_CHANGE.iter().map(|(n, _)| *n).collect();
        let untested: Vec<&str> = RESTART_REQUIRED
            .iter()
            .map(|s| s.name)
            .filter(|n| !tested.contains(n))
            // Selecting FoundationDB needs a binary built with the `fdb` feature; its check is a plain
            // comparison of the parsed path, exercised under that feature.
            .filter(|n| *n != "ledger.cluster_file" || cfg!(feature = "fdb"))
            // Changed beside ledger.postgres: tested below (the CA file in tests/tests/postgres.rs,
            // which can make a certificate for it).
            .filter(|n| !["ledger.postgres_timeout_ms", "ledger.postgres_ca_file"].contains(n))
            .collect();
        assert!(
            untested.is_empty(),
            "no single-change test for {untested:?}"
        );
        let mut names: Vec<&str> = RESTART_REQUIRED.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RESTART_REQUIRED.len(), "a name listed twice");
    }
}
