//! The one line `postern serve` logs at start to say where mail will go:
//! paused or not, the static routes, then the relayhost or MX lookup and
//! the resolver it uses.

use crate::config::{Config, Protocol};

/// Where the system resolver's settings come from (hickory reads this file).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The delivery mode in force, as one line (without a trailing period).
/// `resolv_conf` is the text of [`RESOLV_CONF`], or `None` when it could not
/// be read; it is only consulted when MX lookup uses the system resolver.
pub fn summary(config: &Config, resolv_conf: Option<&str>) -> String {
    let delivery = &config.delivery;
    let fallback = match &delivery.relayhost {
        Some(relayhost) => format!("to relayhost {relayhost} (no MX lookup)"),
        None => format!(
            "by MX lookup (port {}) with {}",
            delivery.mx_port,
            resolver(config, resolv_conf)
        ),
    };
    let routing = if config.routes.is_empty() {
        format!("all mail {fallback}")
    } else {
        let routes: Vec<String> = config
            .routes
            .iter()
            .map(|route| {
                let mut text = format!("{} -> {}", route.domains.join(", "), route.next_hop);
                if route.protocol == Protocol::Lmtp {
                    text.push_str(" (lmtp)");
                }
                if route.early_delivery {
                    text.push_str(" (early delivery)");
                }
                text
            })
            .collect();
        format!(
            "{} static route{} ({}); every other domain {fallback}",
            routes.len(),
            if routes.len() == 1 { "" } else { "s" },
            routes.join("; ")
        )
    };
    if delivery.paused {
        format!(
            "PAUSED (delivery.paused = true): mail is accepted and queued but nothing is \
             delivered; unpaused it would go: {routing}"
        )
    } else {
        routing
    }
}

/// The resolver MX lookups use.
fn resolver(config: &Config, resolv_conf: Option<&str>) -> String {
    if !config.dns.nameservers.is_empty() {
        let servers: Vec<String> = config
            .dns
            .nameservers
            .iter()
            .map(ToString::to_string)
            .collect();
        return format!("dns.nameservers {}", servers.join(", "));
    }
    let Some(text) = resolv_conf else {
        return format!("the system resolver ({RESOLV_CONF}, unreadable)");
    };
    let servers: Vec<&str> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(address)) => Some(address),
                _ => None,
            }
        })
        .collect();
    if servers.is_empty() {
        format!("the system resolver ({RESOLV_CONF}, no nameserver lines)")
    } else {
        format!(
            "the system resolver ({RESOLV_CONF}: nameserver {})",
            servers.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;

    const RESOLV: &str = "# generated\nsearch example.org\nnameserver 10.0.0.2\nnameserver  ::1 \n";

    fn route(domains: &[&str], next_hop: &str, protocol: Protocol, early: bool) -> RouteConfig {
        RouteConfig {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            next_hop: next_hop.into(),
            protocol,
            tls: Default::default(),
            auth_file: None,
            early_delivery: early,
            early_budget: crate::config::DEFAULT_EARLY_BUDGET,
        }
    }

    #[test]
    fn the_default_is_mx_lookup_with_the_system_resolver() {
        let config = Config::default();
        assert_eq!(
            summary(&config, Some(RESOLV)),
            "all mail by MX lookup (port 25) with the system resolver \
             (/etc/resolv.conf: nameserver 10.0.0.2, ::1)"
        );
        assert_eq!(
            summary(&config, None),
            "all mail by MX lookup (port 25) with the system resolver (/etc/resolv.conf, unreadable)"
        );
        assert_eq!(
            summary(&config, Some("search x\n")),
            "all mail by MX lookup (port 25) with the system resolver \
             (/etc/resolv.conf, no nameserver lines)"
        );
    }

    #[test]
    fn configured_nameservers_relayhost_routes_and_pause_are_named() {
        let mut config = Config::default();
        config.dns.nameservers = vec!["127.0.0.1:5353".parse().unwrap()];
        config.delivery.mx_port = 2526;
        assert_eq!(
            summary(&config, Some(RESOLV)),
            "all mail by MX lookup (port 2526) with dns.nameservers 127.0.0.1:5353"
        );

        config.delivery.relayhost = Some("[smarthost.example.org]:587".into());
        assert_eq!(
            summary(&config, Some(RESOLV)),
            "all mail to relayhost [smarthost.example.org]:587 (no MX lookup)"
        );

        config.routes = vec![
            route(
                &["example.org", ".example.org"],
                "unix:/run/dovecot/lmtp",
                Protocol::Lmtp,
                false,
            ),
            route(&["dest.test"], "10.0.0.7:25", Protocol::Smtp, true),
        ];
        assert_eq!(
            summary(&config, Some(RESOLV)),
            "2 static routes (example.org, .example.org -> unix:/run/dovecot/lmtp (lmtp); \
             dest.test -> 10.0.0.7:25 (early delivery)); every other domain to relayhost \
             [smarthost.example.org]:587 (no MX lookup)"
        );

        config.routes.truncate(1);
        config.delivery.relayhost = None;
        config.delivery.paused = true;
        assert_eq!(
            summary(&config, Some(RESOLV)),
            "PAUSED (delivery.paused = true): mail is accepted and queued but nothing is \
             delivered; unpaused it would go: 1 static route (example.org, .example.org -> \
             unix:/run/dovecot/lmtp (lmtp)); every other domain by MX lookup (port 2526) with \
             dns.nameservers 127.0.0.1:5353"
        );
    }
}
