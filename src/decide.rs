//! Small pure functions the plan and the executor share: deterministic jitter and the AWX
//! host allow-list.

use sha2::{Digest, Sha256};

/// A number in [0, 1) derived from `parts`: stable for the same inputs, spread across objects.
pub fn jitter(parts: &[&str]) -> f64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether `host` (host or host:port of the AWX URL) is in the allow-list. An entry without a
/// port allows any port; `*.example.com` allows subdomains.
pub fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let bare = match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some((h, port)) if h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host.as_str(),
    };
    allowed.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        if let Some(suffix) = entry.strip_prefix("*.") {
            bare.ends_with(&format!(".{suffix}"))
        } else if entry.contains(':') && !entry.starts_with('[') || entry.contains("]:") {
            entry == host
        } else {
            entry == bare
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_stable_and_in_range() {
        let a = jitter(&["uid-1", "3"]);
        assert_eq!(a, jitter(&["uid-1", "3"]));
        assert_ne!(a, jitter(&["uid-2", "3"]));
        for i in 0..1000 {
            let j = jitter(&["u", &i.to_string()]);
            assert!((0.0..1.0).contains(&j));
        }
    }

    #[test]
    fn allowed_hosts_match_host_port_and_wildcards() {
        let allowed = vec![
            "awx.example.com".to_string(),
            "127.0.0.1:8052".to_string(),
            "*.corp.example".to_string(),
        ];
        assert!(host_allowed(&allowed, "awx.example.com"));
        assert!(host_allowed(&allowed, "AWX.example.com:8443"));
        assert!(host_allowed(&allowed, "127.0.0.1:8052"));
        assert!(!host_allowed(&allowed, "127.0.0.1:8053"));
        assert!(host_allowed(&allowed, "a.b.corp.example"));
        assert!(!host_allowed(&allowed, "corp.example"));
        assert!(!host_allowed(&allowed, "awx.example.com.evil.io"));
        assert!(!host_allowed(&allowed, "10.0.0.1"));
        assert!(!host_allowed(&[], "awx.example.com"));
    }

    #[test]
    fn allowed_hosts_handle_ipv6_literals_and_refuse_look_alikes() {
        let allowed = vec![
            "[::1]".to_string(),
            "[2001:db8::1]:8443".to_string(),
            " AWX.Example.com ".to_string(),
        ];
        assert!(host_allowed(&allowed, "[::1]"));
        assert!(host_allowed(&allowed, "[::1]:8052"));
        assert!(host_allowed(&allowed, "[2001:db8::1]:8443"));
        assert!(!host_allowed(&allowed, "[2001:db8::1]"));
        assert!(!host_allowed(&allowed, "[2001:db8::1]:443"));
        assert!(host_allowed(&allowed, "awx.example.com"));
        for refused in [
            "[::2]",
            "[::ffff:7f00:1]",
            "127.0.0.1",
            "awx.example.com.",
            "xawx.example.com",
            "awx.example.com.evil.example",
            "evil.example",
            "",
        ] {
            assert!(!host_allowed(&allowed, refused), "{refused:?}");
        }
        // A wildcard never matches the bare domain or a look-alike suffix.
        let wildcard = vec!["*.example.com".to_string()];
        assert!(host_allowed(&wildcard, "awx.example.com:8443"));
        assert!(!host_allowed(&wildcard, "example.com"));
        assert!(!host_allowed(&wildcard, "evilexample.com"));
        assert!(!host_allowed(&wildcard, "awx.example.com.evil.example"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A host name as validation leaves it: lowercase DNS labels, an IPv4 or an IPv6
        /// literal.
        fn host_name() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,3}",
                (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
                    .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
                any::<u128>().prop_map(|ip| format!("[{}]", std::net::Ipv6Addr::from(ip))),
            ]
        }

        fn with_port(host: &str, port: Option<u16>) -> String {
            match port {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn jitter_is_deterministic_and_below_one(
                parts in prop::collection::vec(any::<String>(), 0..5),
            ) {
                let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                let j = jitter(&parts);
                prop_assert!((0.0..1.0).contains(&j), "{}", j);
                prop_assert_eq!(j.to_bits(), jitter(&parts).to_bits());
            }

            #[test]
            fn host_allowed_never_panics_and_an_empty_list_allows_nothing(
                allowed in prop::collection::vec(any::<String>(), 0..5),
                host in any::<String>(),
            ) {
                let _ = host_allowed(&allowed, &host);
                prop_assert!(!host_allowed(&[], &host));
            }

            #[test]
            fn host_entries_allow_exactly_their_host_and_port(
                host in host_name(),
                other in host_name(),
                port in prop::option::of(any::<u16>()),
                other_port in any::<u16>(),
                shout in any::<bool>(),
            ) {
                let target = with_port(&host, port);
                let entry = if shout { host.to_uppercase() } else { host.clone() };
                // Host alone: any port of that host.
                prop_assert!(host_allowed(std::slice::from_ref(&entry), &target), "{} {}", entry, target);
                // Host and port: that port only.
                let pinned = vec![format!("{entry}:{other_port}")];
                prop_assert_eq!(
                    host_allowed(&pinned, &target),
                    port == Some(other_port),
                    "{:?} {}", pinned, target
                );
                // The exact host string validation produces always matches itself.
                prop_assert!(host_allowed(std::slice::from_ref(&target), &target));
                if other != host {
                    prop_assert!(!host_allowed(std::slice::from_ref(&other), &target), "{} {}", other, target);
                    let pinned_other = vec![format!("{other}:{other_port}")];
                    prop_assert!(!host_allowed(&pinned_other, &target), "{:?} {}", pinned_other, target);
                }
            }

            #[test]
            fn wildcards_allow_only_strict_subdomains(
                sub in "[a-z0-9]([a-z0-9.-]{0,10}[a-z0-9])?",
                domain in "[a-z0-9]{1,8}\\.[a-z]{2,4}",
                host in host_name(),
                port in prop::option::of(any::<u16>()),
            ) {
                let wildcard = vec![format!("*.{domain}")];
                let subdomain = with_port(&format!("{sub}.{domain}"), port);
                prop_assert!(host_allowed(&wildcard, &subdomain), "{}", subdomain);
                prop_assert!(!host_allowed(&wildcard, &with_port(&domain, port)));
                let allowed = host_allowed(&wildcard, &with_port(&host, port));
                prop_assert_eq!(allowed, host.ends_with(&format!(".{domain}")), "{}", host);
            }
        }
    }
}
