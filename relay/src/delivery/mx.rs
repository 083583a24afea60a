//! Turning a destination into connection targets: static next hops, MX
//! records in preference order, implicit MX, and null MX (RFC 7505).

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use super::client::Target;
use super::route::{Destination, NextHop};
use crate::config::DnsConfig;

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Hosts to try, best first.
    Targets(Vec<Target>),
    /// The domain says it accepts no mail (RFC 7505): a permanent failure.
    NullMx,
    /// The domain or its mail hosts do not exist: a permanent failure.
    NotFound(String),
    /// DNS trouble: try again later.
    Temporary(String),
}

/// DNS resolver for deliveries.
pub struct MxResolver {
    resolver: TokioResolver,
    mx_port: u16,
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver")
            .field("mx_port", &self.mx_port)
            .finish()
    }
}

impl MxResolver {
    /// A resolver using the configured name servers, or the system's.
    pub fn new(dns: &DnsConfig, mx_port: u16) -> Result<MxResolver, String> {
        let builder = if dns.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|err| format!("system resolver: {err}"))?
        } else {
            let servers = dns
                .nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let resolver = builder.build().map_err(|err| format!("resolver: {err}"))?;
        Ok(MxResolver { resolver, mx_port })
    }

    /// The targets for a destination, best first.
    pub async fn resolve(&self, destination: &Destination) -> Resolution {
        match &destination.next_hop {
            Some(NextHop::Unix(path)) => Resolution::Targets(vec![Target::Unix(path.clone())]),
            Some(NextHop::Host { host, port }) => match self.addresses(host).await {
                Ok(ips) if !ips.is_empty() => Resolution::Targets(
                    ips.into_iter()
                        .map(|ip| Target::Tcp {
                            addr: SocketAddr::new(ip, *port),
                            name: host.clone(),
                        })
                        .collect(),
                ),
                Ok(_) => Resolution::NotFound(format!("next hop {host} has no address")),
                Err(resolution) => resolution,
            },
            None => self.mx(&destination.domain).await,
        }
    }

    async fn mx(&self, domain: &str) -> Resolution {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let lookup = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup,
            Err(err) if err.is_nx_domain() => {
                return Resolution::NotFound(format!("domain {domain} does not exist"))
            }
            Err(err) if err.is_no_records_found() => {
                // No MX: the domain itself is the mail host (RFC 5321 §5.1).
                return match self.addresses(domain).await {
                    Ok(ips) if !ips.is_empty() => Resolution::Targets(
                        ips.into_iter()
                            .map(|ip| Target::Tcp {
                                addr: SocketAddr::new(ip, self.mx_port),
                                name: domain.to_owned(),
                            })
                            .collect(),
                    ),
                    Ok(_) => {
                        Resolution::NotFound(format!("domain {domain} has no MX and no address"))
                    }
                    Err(resolution) => resolution,
                };
            }
            Err(err) => return Resolution::Temporary(format!("MX lookup for {domain}: {err}")),
        };
        let mut records: Vec<(u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect();
        if records.len() == 1 && (records[0].1 == "." || records[0].1.is_empty()) {
            return Resolution::NullMx;
        }
        records.retain(|(_, host)| host != "." && !host.is_empty());
        records.sort_by_key(|(preference, _)| *preference);
        let mut targets = Vec::new();
        let mut last_error = None;
        for (_, host) in records {
            let host = host.trim_end_matches('.').to_owned();
            match self.addresses(&host).await {
                Ok(ips) => targets.extend(ips.into_iter().map(|ip| Target::Tcp {
                    addr: SocketAddr::new(ip, self.mx_port),
                    name: host.clone(),
                })),
                Err(resolution) => last_error = Some(resolution),
            }
        }
        if targets.is_empty() {
            return last_error.unwrap_or_else(|| {
                Resolution::NotFound(format!("no usable MX host for {domain}"))
            });
        }
        Resolution::Targets(targets)
    }

    async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, Resolution> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => Ok(lookup.iter().collect()),
            Err(err) if err.is_nx_domain() || err.is_no_records_found() => {
                Err(Resolution::NotFound(format!("host {host} not found")))
            }
            Err(err) => Err(Resolution::Temporary(format!(
                "address lookup for {host}: {err}"
            ))),
        }
    }
}
