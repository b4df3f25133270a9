//! A member's configuration: one TOML file, every key optional, `GRID_*` environment
//! variables on top.
//!
//! ```toml
//! cluster_name = "orders"
//! member_id = "orders-1"          # default: random
//!
//! [network]
//! bind = "10.0.0.5:5701"
//! seeds = ["10.0.0.6:5701", "orders-2.internal:5701"]
//! bulk_port = 5801                # partition copies; default: any free port
//! bulk_priority = "idle"          # copies' threads: idle (default), nice or normal
//! socket_buffer = 4194304         # UDP buffers (default 4 MiB, capped by net.core.rmem_max)
//!
//! [tls]                           # production: all three files
//! ca = "/etc/grid/ca.pem"
//! cert = "/etc/grid/member.pem"
//! key = "/etc/grid/member.key"
//!
//! [multicast]
//! enabled = false
//!
//! [membership]
//! gossip_interval_ms = 100
//! join_timeout_ms = 2000          # looking for the cluster before starting one alone
//!
//! [partitions]
//! count = 271                     # fixed for the life of the cluster
//! backups = 1                     # synchronous: the caller waits for them
//! async_backups = 0               # asynchronous: sent every change, not waited for
//!
//! [attributes]
//! zone = "eu-west-1a"
//!
//! [metrics]
//! listen = "127.0.0.1:9701"       # /metrics, /healthz, /readyz; default: off (grid node: on)
//! ```
//!
//! Environment overrides (applied by [`GridConfig::load`] and [`GridConfig::apply_env`]):
//! [`ENV_VARS`]. Every key and variable, with its default and allowed values, is in
//! [`REFERENCE`] (rendered as `docs/CONFIG.md` by [`reference_markdown`], and tested against
//! the structs so that the two cannot drift). An unknown key is an error that names it; a
//! bad value names its key (or variable) and what is allowed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use grid_net::config::{MembershipConfig, MulticastConfig, NetConfig, NetworkConfig, TlsConfig};
use serde::{Deserialize, Serialize};

use crate::GridError;

/// The whole configuration of a member. `Default` works on one machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GridConfig {
    /// The cluster's name (default `"grid"`). Members of other clusters are refused.
    pub cluster_name: String,
    /// This member's id (default: random). Keep it stable across restarts.
    pub member_id: Option<String>,
    /// Addresses and seeds.
    pub network: NetworkConfig,
    /// Identity: PEM files, or a development secret.
    pub tls: TlsConfig,
    /// Multicast discovery.
    pub multicast: MulticastConfig,
    /// Gossip and failure detection.
    pub membership: MembershipConfig,
    /// Member attributes (`host`, `zone`, `data = "false"` for a lite member…).
    pub attributes: BTreeMap<String, String>,
    /// How data is split and copied.
    pub partitions: PartitionConfig,
    /// The HTTP endpoint of metrics and health probes.
    pub metrics: MetricsConfig,
}

/// The member's HTTP endpoint: Prometheus metrics (`/metrics`) and health probes
/// (`/healthz`, `/readyz`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve on (default: none, no endpoint; `grid node` serves on
    /// `127.0.0.1:9701`, or the next free port, unless started with `--no-metrics`).
    pub listen: Option<SocketAddr>,
}

/// How data is split across members and copied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PartitionConfig {
    /// Partition count, fixed for the life of the cluster (default 271). A member with
    /// another count is refused.
    pub count: u32,
    /// Synchronous backups per partition, 0 to 6 (default 1).
    pub backups: u8,
    /// Asynchronous backups per partition, after the synchronous ones (default 0): they
    /// get every change in order, but the caller does not wait for them. Synchronous plus
    /// asynchronous backups are at most 6.
    pub async_backups: u8,
    /// Put the replicas of a partition on members with distinct values of this attribute
    /// (e.g. `"zone"` or `"host"`).
    pub placement_attribute: Option<String>,
    /// Deadline of one operation, retries included, in milliseconds (default 10000).
    pub op_timeout_ms: u64,
    /// Partition copies the coordinator runs at once (default 8).
    pub max_parallel_migrations: usize,
    /// Milliseconds between anti-entropy passes, which compare backups with their owner
    /// and repair those that differ (default 5000).
    pub anti_entropy_ms: u64,
    /// Milliseconds an owner waits for one backup's acknowledgement before it leaves that
    /// backup behind for anti-entropy to repair (default 5000).
    pub backup_timeout_ms: u64,
    /// Milliseconds a member that sees only a minority of the members its partition table
    /// was planned for waits before it coordinates anyway (default 30000; 0: never). While
    /// it waits, it promotes nothing and publishes no table, so a member cut off or paused
    /// does not make itself the owner of every partition.
    pub minority_takeover_ms: u64,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            count: 271,
            backups: 1,
            async_backups: 0,
            placement_attribute: None,
            op_timeout_ms: 10_000,
            max_parallel_migrations: 8,
            anti_entropy_ms: 5_000,
            backup_timeout_ms: 5_000,
            minority_takeover_ms: 30_000,
        }
    }
}

impl Default for GridConfig {
    fn default() -> Self {
        Self {
            cluster_name: "grid".to_string(),
            member_id: None,
            network: NetworkConfig::default(),
            tls: TlsConfig::default(),
            multicast: MulticastConfig::default(),
            membership: MembershipConfig::default(),
            attributes: BTreeMap::new(),
            partitions: PartitionConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

fn parse_env<T: FromStr>(name: &str, value: &str) -> Result<T, GridError>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| GridError::ConfigEnv {
            name: name.to_string(),
            value: value.to_string(),
            message: with_allowed(e.to_string(), REFERENCE.iter().find(|k| k.env == name)),
        })
}

/// `message`, followed by what the key allows (unless the message says it already).
fn with_allowed(message: String, key: Option<&KeyDoc>) -> String {
    match key {
        Some(k) if !message.contains(k.allowed) => format!("{message} (allowed: {})", k.allowed),
        _ => message,
    }
}

impl GridConfig {
    /// Parses TOML text.
    ///
    /// ```
    /// let c = grid_core::GridConfig::from_toml_str("cluster_name = \"orders\"\n[network]\nseeds = []").unwrap();
    /// assert_eq!(c.cluster_name, "orders");
    /// assert!(grid_core::GridConfig::from_toml_str("clustr_name = \"typo\"").is_err());
    /// ```
    pub fn from_toml_str(text: &str) -> Result<Self, GridError> {
        Self::parse(text, None)
    }

    /// Deserializes `text`, naming the key of the first error and what it allows.
    fn parse(text: &str, path: Option<&Path>) -> Result<Self, GridError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let message = inner.message().trim_end().to_string();
            let message = if let Some(unknown) = message.strip_prefix("unknown field `") {
                // "unknown field `bnd`, expected one of …": the whole dotted key.
                let (name, rest) = unknown.split_once('`').unwrap_or((unknown, ""));
                // The path may stop at the table, or include the unknown key itself.
                let full = if key == "." {
                    name.to_string()
                } else if key == name || key.ends_with(&format!(".{name}")) {
                    key.clone()
                } else {
                    format!("{key}.{name}")
                };
                format!("unknown key `{full}`{rest}")
            } else if key == "." {
                message
            } else {
                let doc = REFERENCE.iter().find(|k| {
                    k.key == key || k.key == "attributes.<name>" && key.starts_with("attributes.")
                });
                format!("`{key}`: {}", with_allowed(message, doc))
            };
            GridError::ConfigInvalid {
                path: path.map(Path::to_path_buf),
                message: match line {
                    Some(line) => format!("{message} (line {line})"),
                    None => message,
                },
            }
        })
    }

    /// Reads a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self, GridError> {
        let text = std::fs::read_to_string(path).map_err(|source| GridError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    /// The file if given (defaults otherwise), then the process's `GRID_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, GridError> {
        let mut config = match path {
            Some(p) => Self::from_toml_file(p)?,
            None => Self::default(),
        };
        config.apply_env(std::env::vars())?;
        Ok(config)
    }

    /// Applies `GRID_*` overrides from `vars` (pass `std::env::vars()`).
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), GridError> {
        for (name, value) in vars {
            if !ENV_VARS.contains(&name.as_str()) {
                if name.starts_with("GRID_") {
                    tracing::debug!(variable = name, "unknown GRID_ variable ignored");
                }
                continue;
            }
            match name.as_str() {
                "GRID_CLUSTER_NAME" => self.cluster_name = value,
                "GRID_MEMBER_ID" => self.member_id = Some(value),
                "GRID_BIND" => self.network.bind = parse_env(&name, &value)?,
                "GRID_ADVERTISE" => self.network.advertise = Some(parse_env(&name, &value)?),
                "GRID_BULK_PORT" => self.network.bulk_port = parse_env(&name, &value)?,
                "GRID_BULK_PRIORITY" => self.network.bulk_priority = parse_env(&name, &value)?,
                "GRID_SOCKET_BUFFER" => self.network.socket_buffer = parse_env(&name, &value)?,
                "GRID_SEEDS" => {
                    self.network.seeds = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                }
                "GRID_CLUSTER_SECRET" => self.tls.secret = Some(value),
                "GRID_TLS_CA" => self.tls.ca = Some(PathBuf::from(value)),
                "GRID_TLS_CERT" => self.tls.cert = Some(PathBuf::from(value)),
                "GRID_TLS_KEY" => self.tls.key = Some(PathBuf::from(value)),
                "GRID_MULTICAST_ENABLED" => self.multicast.enabled = parse_env(&name, &value)?,
                "GRID_MULTICAST_GROUP" => self.multicast.group = parse_env(&name, &value)?,
                "GRID_MULTICAST_PORT" => self.multicast.port = parse_env(&name, &value)?,
                "GRID_METRICS_LISTEN" => self.metrics.listen = Some(parse_env(&name, &value)?),
                "GRID_ATTRIBUTES" => {
                    for pair in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let (k, v) = pair.split_once('=').ok_or_else(|| GridError::ConfigEnv {
                            name: name.clone(),
                            value: value.clone(),
                            message: format!("{pair:?} is not key=value"),
                        })?;
                        self.attributes
                            .insert(k.trim().to_string(), v.trim().to_string());
                    }
                }
                // Read by the `grid` binary (GRID_LOG, GRID_LOG_FORMAT).
                _ => {}
            }
        }
        Ok(())
    }

    /// The networking part, for `grid_net::node::Node::start`.
    pub fn to_net_config(&self) -> NetConfig {
        NetConfig {
            cluster_name: self.cluster_name.clone(),
            member_id: self.member_id.clone(),
            attributes: self.attributes.clone(),
            network: self.network.clone(),
            tls: self.tls.clone(),
            multicast: self.multicast.clone(),
            membership: self.membership.clone(),
            // A member that splits keys differently would route them to the wrong owner.
            must_match: vec![("partitions".to_string(), self.partitions.count.to_string())],
            // Real sockets; the simulator sets its own on the result.
            environment: None,
        }
    }

    /// Checks the values serde cannot: ranges.
    pub fn validate(&self) -> Result<(), GridError> {
        let invalid = |message: String| GridError::ConfigInvalid {
            path: None,
            message,
        };
        if self.partitions.count == 0 {
            return Err(invalid("partitions.count must be at least 1".into()));
        }
        if self.partitions.backups > 6 {
            return Err(invalid(format!(
                "partitions.backups must be 0 to 6, not {}",
                self.partitions.backups
            )));
        }
        if self.partitions.backups + self.partitions.async_backups.min(7) > 6 {
            return Err(invalid(format!(
                "partitions.backups + partitions.async_backups must be at most 6, not {} + {}",
                self.partitions.backups, self.partitions.async_backups
            )));
        }
        Ok(())
    }

    /// The partition runtime's settings.
    pub fn runtime_config(&self) -> crate::runtime::RuntimeConfig {
        crate::runtime::RuntimeConfig {
            table: crate::partition::table::TableConfig {
                partitions: self.partitions.count,
                backups: self.partitions.backups + self.partitions.async_backups,
                placement_attribute: self.partitions.placement_attribute.clone(),
            },
            op_timeout: std::time::Duration::from_millis(self.partitions.op_timeout_ms.max(1)),
            max_parallel_migrations: self.partitions.max_parallel_migrations.max(1),
            anti_entropy_interval: std::time::Duration::from_millis(
                self.partitions.anti_entropy_ms.max(100),
            ),
            backup_timeout: std::time::Duration::from_millis(
                self.partitions.backup_timeout_ms.max(1),
            ),
            async_backups: self.partitions.async_backups,
            minority_takeover: (self.partitions.minority_takeover_ms > 0)
                .then(|| std::time::Duration::from_millis(self.partitions.minority_takeover_ms)),
            copy_priority: self.network.bulk_priority,
            ..crate::runtime::RuntimeConfig::default()
        }
    }
}

/// One configuration key: its TOML path, the `GRID_*` variable that overrides it (empty
/// when none), its default (as TOML, or a sentence starting with "none" when unset), what
/// it allows and what it does. [`REFERENCE`] lists them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDoc {
    /// Dotted TOML key (`network.bind`); `attributes.<name>` for the attribute map; empty
    /// for a variable with no key.
    pub key: &'static str,
    /// The environment variable, or `""`.
    pub env: &'static str,
    /// The default, rendered as TOML (or "none…").
    pub default: &'static str,
    /// What values are allowed.
    pub allowed: &'static str,
    /// What the key does.
    pub meaning: &'static str,
}

const fn k(
    key: &'static str,
    env: &'static str,
    default: &'static str,
    allowed: &'static str,
    meaning: &'static str,
) -> KeyDoc {
    KeyDoc {
        key,
        env,
        default,
        allowed,
        meaning,
    }
}

/// Every key of the configuration file and every `GRID_*` variable. Tested against the
/// structs (every field listed, defaults as [`GridConfig::default`] has them) and against
/// [`GridConfig::apply_env`]; `docs/CONFIG.md` is [`reference_markdown`]'s output.
pub const REFERENCE: &[KeyDoc] = &[
    k(
        "cluster_name",
        "GRID_CLUSTER_NAME",
        "\"grid\"",
        "a string",
        "The cluster's name; members of other clusters are refused.",
    ),
    k(
        "member_id",
        "GRID_MEMBER_ID",
        "none (random)",
        "a string",
        "This member's id; keep it stable across restarts.",
    ),
    k(
        "network.bind",
        "GRID_BIND",
        "\"127.0.0.1:5701\"",
        "IP:port (port 0: any free port)",
        "UDP address of the member's QUIC port.",
    ),
    k(
        "network.port_auto_increment",
        "",
        "100",
        "0 to 65535",
        "When the bind port is taken, how many next ports to try (ignored for port 0).",
    ),
    k(
        "network.advertise",
        "GRID_ADVERTISE",
        "none (the bound address)",
        "IP:port",
        "The address other members dial, when it differs from `bind` (NAT, 0.0.0.0).",
    ),
    k(
        "network.seeds",
        "GRID_SEEDS",
        "[\"127.0.0.1:5701\", \"127.0.0.1:5702\", \"127.0.0.1:5703\"]",
        "list of host:port (DNS names allowed; the variable: comma-separated)",
        "Members asked first; they may come up later.",
    ),
    k(
        "network.max_frame_size",
        "",
        "16777216",
        "bytes",
        "Largest frame sent or accepted.",
    ),
    k(
        "network.max_udp_payload",
        "",
        "8952",
        "1200 to 65527",
        "Largest UDP payload path MTU discovery may grow packets to.",
    ),
    k(
        "network.bulk_endpoint",
        "",
        "true",
        "true or false",
        "Partition copies on a second QUIC port at lower priority (false: the main port).",
    ),
    k(
        "network.bulk_port",
        "GRID_BULK_PORT",
        "0",
        "0 to 65535 (0: any free port)",
        "UDP port of the partition-copy endpoint, on the bind address.",
    ),
    k(
        "network.bulk_priority",
        "GRID_BULK_PRIORITY",
        "\"idle\"",
        "idle, nice or normal",
        "How the threads that copy partitions are scheduled.",
    ),
    k(
        "network.socket_buffer",
        "GRID_SOCKET_BUFFER",
        "4194304",
        "bytes (0: the OS default)",
        "Receive and send buffer of each UDP socket (capped by net.core.rmem_max / wmem_max).",
    ),
    k(
        "tls.ca",
        "GRID_TLS_CA",
        "none",
        "path of a PEM file",
        "The cluster CA certificate (production, with `cert` and `key`).",
    ),
    k(
        "tls.cert",
        "GRID_TLS_CERT",
        "none",
        "path of a PEM file",
        "This member's certificate chain.",
    ),
    k(
        "tls.key",
        "GRID_TLS_KEY",
        "none",
        "path of a PEM file",
        "This member's private key.",
    ),
    k(
        "tls.secret",
        "GRID_CLUSTER_SECRET",
        "none (derived from the cluster name, with a warning)",
        "a string",
        "Development identity: the cluster CA is derived from this secret. Never logged.",
    ),
    k(
        "multicast.enabled",
        "GRID_MULTICAST_ENABLED",
        "false",
        "true or false",
        "Multicast discovery.",
    ),
    k(
        "multicast.group",
        "GRID_MULTICAST_GROUP",
        "\"224.2.2.3\"",
        "an IPv4 multicast address",
        "The multicast group.",
    ),
    k(
        "multicast.port",
        "GRID_MULTICAST_PORT",
        "54327",
        "1 to 65535",
        "The multicast UDP port.",
    ),
    k(
        "multicast.ttl",
        "",
        "1",
        "0 to 255",
        "Time-to-live of announcements (1: the local network).",
    ),
    k(
        "multicast.interface",
        "",
        "none (the bind address's, else the OS's choice)",
        "an IPv4 address",
        "The interface to join and send on.",
    ),
    k(
        "multicast.interval_ms",
        "",
        "1000",
        "milliseconds",
        "Time between announcements.",
    ),
    k(
        "membership.gossip_interval_ms",
        "",
        "100",
        "milliseconds (at least 10)",
        "Time between gossip rounds.",
    ),
    k(
        "membership.phi_threshold",
        "",
        "10.0",
        "a positive number",
        "Phi-accrual threshold of failure detection (about 1 to 1.5 s on a LAN).",
    ),
    k(
        "membership.join_timeout_ms",
        "",
        "2000",
        "milliseconds",
        "How long a starting member looks for its cluster before starting one alone.",
    ),
    k(
        "attributes.<name>",
        "GRID_ATTRIBUTES",
        "none",
        "strings (the variable: k=v,k=v)",
        "Member attributes, gossiped (`zone`, `host`, `data = \"false\"` for a lite member).",
    ),
    k(
        "partitions.count",
        "",
        "271",
        "at least 1",
        "Partition count, fixed for the life of the cluster.",
    ),
    k(
        "partitions.backups",
        "",
        "1",
        "0 to 6",
        "Synchronous backups per partition.",
    ),
    k(
        "partitions.async_backups",
        "",
        "0",
        "0 to 6, with backups at most 6",
        "Asynchronous backups per partition, after the synchronous ones.",
    ),
    k(
        "partitions.placement_attribute",
        "",
        "none",
        "an attribute name",
        "Put a partition's replicas on members with distinct values of this attribute.",
    ),
    k(
        "partitions.op_timeout_ms",
        "",
        "10000",
        "milliseconds",
        "Deadline of one operation, retries included.",
    ),
    k(
        "partitions.max_parallel_migrations",
        "",
        "8",
        "at least 1",
        "Partition copies the coordinator runs at once.",
    ),
    k(
        "partitions.anti_entropy_ms",
        "",
        "5000",
        "milliseconds (at least 100)",
        "Time between anti-entropy passes.",
    ),
    k(
        "partitions.backup_timeout_ms",
        "",
        "5000",
        "milliseconds",
        "How long an owner waits for a backup's acknowledgement.",
    ),
    k(
        "partitions.minority_takeover_ms",
        "",
        "30000",
        "milliseconds (0: never)",
        "How long a member that sees only a minority of its table's members waits before it coordinates anyway.",
    ),
    k(
        "metrics.listen",
        "GRID_METRICS_LISTEN",
        "none (off; `grid node`: 127.0.0.1:9701 or the next free port)",
        "IP:port",
        "Where to serve /metrics (Prometheus), /healthz and /readyz.",
    ),
    k(
        "",
        "GRID_LOG",
        "info (`grid node`)",
        "a tracing filter (e.g. `info,grid_core=debug`)",
        "Log level of the `grid` binary.",
    ),
    k(
        "",
        "GRID_LOG_FORMAT",
        "text",
        "text or json",
        "Format of the `grid` binary's logs, on stderr: json writes one object per line.",
    ),
];

/// The `GRID_*` variables [`GridConfig::apply_env`] reads (`GRID_LOG` and
/// `GRID_LOG_FORMAT` are the binary's; the others set the keys [`REFERENCE`] names).
pub const ENV_VARS: &[&str] = &[
    "GRID_CLUSTER_NAME",
    "GRID_MEMBER_ID",
    "GRID_BIND",
    "GRID_ADVERTISE",
    "GRID_SEEDS",
    "GRID_BULK_PORT",
    "GRID_BULK_PRIORITY",
    "GRID_SOCKET_BUFFER",
    "GRID_TLS_CA",
    "GRID_TLS_CERT",
    "GRID_TLS_KEY",
    "GRID_CLUSTER_SECRET",
    "GRID_MULTICAST_ENABLED",
    "GRID_MULTICAST_GROUP",
    "GRID_MULTICAST_PORT",
    "GRID_ATTRIBUTES",
    "GRID_METRICS_LISTEN",
    "GRID_LOG",
    "GRID_LOG_FORMAT",
];

/// [`REFERENCE`] as a Markdown table (the body of `docs/CONFIG.md`).
pub fn reference_markdown() -> String {
    let mut out =
        String::from("| key | variable | default | allowed | meaning |\n|---|---|---|---|---|\n");
    let code = |s: &str| {
        if s.is_empty() {
            String::new()
        } else {
            format!("`{s}`")
        }
    };
    for d in REFERENCE {
        let default = if d.default.starts_with("none") || d.key.is_empty() {
            d.default.to_string()
        } else {
            format!("`{}`", d.default)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            code(d.key),
            code(d.env),
            default,
            d.allowed,
            d.meaning
        ));
    }
    out
}

/// The field names of a struct that derives `Deserialize`, asked of it without data.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

impl GridConfig {
    /// Every key the configuration file accepts, dotted (`network.bind`), in the structs'
    /// order; the attribute map is `attributes.<name>`.
    ///
    /// ```
    /// let keys = grid_core::GridConfig::keys();
    /// assert!(keys.contains(&"network.bind".to_string()));
    /// assert!(keys.contains(&"metrics.listen".to_string()));
    /// ```
    pub fn keys() -> Vec<String> {
        let mut keys = Vec::new();
        for top in fields_of::<Self>() {
            let section = match *top {
                "network" => fields_of::<NetworkConfig>(),
                "tls" => fields_of::<TlsConfig>(),
                "multicast" => fields_of::<MulticastConfig>(),
                "membership" => fields_of::<MembershipConfig>(),
                "partitions" => fields_of::<PartitionConfig>(),
                "metrics" => fields_of::<MetricsConfig>(),
                "attributes" => &["<name>"],
                _ => {
                    keys.push(top.to_string());
                    continue;
                }
            };
            keys.extend(section.iter().map(|f| format!("{top}.{f}")));
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grid_net::bulk_runtime::BulkPriority;

    #[test]
    fn file_then_env() {
        let mut c = GridConfig::from_toml_str(
            r#"
            cluster_name = "orders"
            [network]
            bind = "127.0.0.1:6000"
            seeds = ["a:1"]
            bulk_endpoint = false
            bulk_priority = "nice"
            [multicast]
            enabled = true
            [attributes]
            zone = "a"
            "#,
        )
        .unwrap();
        assert_eq!(c.network.bind.port(), 6000);
        assert!(!c.network.bulk_endpoint);
        assert_eq!(c.network.bulk_priority, BulkPriority::Nice);
        assert!(c.multicast.enabled);
        c.apply_env([
            ("GRID_SEEDS".to_string(), "b:1, c:2".to_string()),
            ("GRID_ATTRIBUTES".to_string(), "zone=b,host=h1".to_string()),
            ("GRID_MULTICAST_ENABLED".to_string(), "false".to_string()),
            ("GRID_BULK_PORT".to_string(), "6001".to_string()),
            ("GRID_BULK_PRIORITY".to_string(), "normal".to_string()),
            ("GRID_SOCKET_BUFFER".to_string(), "0".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .unwrap();
        assert_eq!(c.network.seeds, vec!["b:1", "c:2"]);
        assert_eq!(c.attributes["zone"], "b");
        assert_eq!(c.attributes["host"], "h1");
        assert!(!c.multicast.enabled);
        assert_eq!(c.network.bulk_port, 6001);
        assert_eq!(c.network.bulk_priority, BulkPriority::Normal);
        assert_eq!(c.network.socket_buffer, 0);
        assert!(c
            .apply_env([("GRID_BULK_PRIORITY".to_string(), "low".to_string())])
            .is_err());
        let err = c
            .apply_env([("GRID_BIND".to_string(), "nope".to_string())])
            .unwrap_err();
        assert!(err.to_string().contains("GRID_BIND"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(GridConfig::from_toml_str("[network]\nbnd = \"x\"").is_err());
    }

    #[test]
    fn defaults_work_alone() {
        let c = GridConfig::default();
        assert_eq!(c.network.bind.port(), 5701);
        assert!(!c.multicast.enabled);
    }

    #[test]
    fn asynchronous_backups_count_toward_the_table_and_the_limit() {
        let mut c =
            GridConfig::from_toml_str("[partitions]\nbackups = 1\nasync_backups = 2").unwrap();
        assert!(c.validate().is_ok());
        let rt = c.runtime_config();
        assert_eq!((rt.table.backups, rt.async_backups), (3, 2));
        c.partitions.async_backups = 6;
        assert!(c.validate().is_err(), "1 + 6 backups is more than 6");
    }

    #[test]
    fn the_reference_lists_every_key_with_its_default() {
        let documented: Vec<&str> = REFERENCE
            .iter()
            .filter(|d| !d.key.is_empty())
            .map(|d| d.key)
            .collect();
        let keys = GridConfig::keys();
        assert_eq!(documented, keys, "REFERENCE and the config structs differ");
        let defaults = toml::Value::try_from(GridConfig::default()).unwrap();
        for d in REFERENCE.iter().filter(|d| !d.key.is_empty()) {
            let value = d.key.split('.').try_fold(&defaults, |v, part| v.get(part));
            match value {
                Some(v) => assert_eq!(d.default, v.to_string(), "default of {}", d.key),
                None => assert!(d.default.starts_with("none"), "{} has a default", d.key),
            }
        }
    }

    #[test]
    fn every_variable_is_documented_and_sets_its_key() {
        let documented: Vec<&str> = REFERENCE
            .iter()
            .filter(|d| !d.env.is_empty())
            .map(|d| d.env)
            .collect();
        let mut listed = ENV_VARS.to_vec();
        let mut sorted = documented.clone();
        listed.sort_unstable();
        sorted.sort_unstable();
        assert_eq!(listed, sorted, "ENV_VARS and REFERENCE differ");
        let samples = [
            ("GRID_CLUSTER_NAME", "x"),
            ("GRID_MEMBER_ID", "m"),
            ("GRID_BIND", "127.0.0.2:1"),
            ("GRID_ADVERTISE", "127.0.0.2:1"),
            ("GRID_SEEDS", "a:1"),
            ("GRID_BULK_PORT", "7"),
            ("GRID_BULK_PRIORITY", "nice"),
            ("GRID_SOCKET_BUFFER", "7"),
            ("GRID_TLS_CA", "/ca"),
            ("GRID_TLS_CERT", "/cert"),
            ("GRID_TLS_KEY", "/key"),
            ("GRID_CLUSTER_SECRET", "s"),
            ("GRID_MULTICAST_ENABLED", "true"),
            ("GRID_MULTICAST_GROUP", "224.0.0.9"),
            ("GRID_MULTICAST_PORT", "7"),
            ("GRID_ATTRIBUTES", "a=b"),
            ("GRID_METRICS_LISTEN", "127.0.0.1:9"),
        ];
        for var in ENV_VARS {
            if var.starts_with("GRID_LOG") {
                continue; // the binary's
            }
            let (_, value) = samples
                .iter()
                .find(|(n, _)| n == var)
                .unwrap_or_else(|| panic!("no sample value for {var}"));
            let mut c = GridConfig::default();
            c.apply_env([(var.to_string(), value.to_string())]).unwrap();
            assert_ne!(c, GridConfig::default(), "{var} changed nothing");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = GridConfig::from_toml_str("[network]\nbnd = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `network.bnd`,"), "{e}");
        let e = GridConfig::from_toml_str("clustr_name = \"typo\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `clustr_name`,"), "{e}");
        let e = GridConfig::from_toml_str("[network]\nbulk_priority = \"low\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network.bulk_priority") && e.contains("idle"),
            "{e}"
        );
        let e = GridConfig::from_toml_str("[network]\n\nbind = \"nope\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network.bind") && e.contains("IP:port") && e.contains("line 3"),
            "{e}"
        );
        let e = GridConfig::from_toml_str("[partitions]\nbackups = -1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("partitions.backups") && e.contains("0 to 6"),
            "{e}"
        );
        let e = GridConfig::default()
            .apply_env([("GRID_METRICS_LISTEN".to_string(), "9100".to_string())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GRID_METRICS_LISTEN") && e.contains("IP:port"),
            "{e}"
        );
    }
}
