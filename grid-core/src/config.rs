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
//! ```
//!
//! Environment overrides (applied by [`GridConfig::load`] and
//! [`GridConfig::apply_env`]): `GRID_CLUSTER_NAME`, `GRID_MEMBER_ID`, `GRID_BIND`,
//! `GRID_ADVERTISE`, `GRID_BULK_PORT`, `GRID_BULK_PRIORITY`, `GRID_SEEDS` (comma-separated),
//! `GRID_CLUSTER_SECRET`, `GRID_TLS_CA`, `GRID_TLS_CERT`, `GRID_TLS_KEY`,
//! `GRID_MULTICAST_ENABLED`, `GRID_MULTICAST_GROUP`, `GRID_MULTICAST_PORT`, `GRID_ATTRIBUTES`
//! (`k=v,k=v`).

use std::collections::BTreeMap;
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
            message: e.to_string(),
        })
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
        toml::from_str(text).map_err(|e| GridError::ConfigInvalid {
            path: None,
            message: e.to_string(),
        })
    }

    /// Reads a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self, GridError> {
        let text = std::fs::read_to_string(path).map_err(|source| GridError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| GridError::ConfigInvalid {
            path: Some(path.to_path_buf()),
            message: e.to_string(),
        })
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
                other if other.starts_with("GRID_") && other != "GRID_LOG" => {
                    tracing::debug!(variable = other, "unknown GRID_ variable ignored");
                }
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
            copy_priority: self.network.bulk_priority,
            ..crate::runtime::RuntimeConfig::default()
        }
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
}
