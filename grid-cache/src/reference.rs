//! [`CachedReference<V>`]: one cluster-wide value, computed on demand by a supplier
//! (atlassian-cache's `CachedReference`).

use std::future::Future;

use grid_core::GridError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::Cache;

/// A single value shared by the cluster: [`CachedReference::get`] returns it, computing it
/// with the supplier (once across the cluster) when it is absent; [`CachedReference::reset`]
/// forgets it everywhere, so that the next `get` computes it again.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), grid_core::GridError> {
/// # let grid = grid::Grid::builder().bind("127.0.0.1:0").no_seeds().cluster_name("ref-doc").start().await?;
/// let config = grid
///     .cached_reference("feature-flags", || async { Ok::<_, String>(vec!["dark-mode".to_string()]) })
///     .await?;
/// assert_eq!(config.get().await?, vec!["dark-mode".to_string()]);
/// config.reset().await?;
/// # grid.shutdown().await;
/// # Ok(()) }
/// ```
pub struct CachedReference<V> {
    cache: Cache<(), V>,
}

impl<V> Clone for CachedReference<V> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
        }
    }
}

impl<V> std::fmt::Debug for CachedReference<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedReference").finish()
    }
}

impl<V: Serialize + DeserializeOwned + Send + Sync + 'static> CachedReference<V> {
    pub(crate) fn new(cache: Cache<(), V>) -> Self {
        Self { cache }
    }

    /// The value, computed by the supplier if absent. A supplier's error reaches the
    /// caller as [`GridError::Loader`] and nothing is stored.
    pub async fn get(&self) -> Result<V, GridError> {
        self.cache.get(&()).await?.ok_or_else(|| GridError::Loader {
            cache: self.cache.name().to_string(),
            message: "the supplier gave no value".into(),
        })
    }

    /// Forgets the value on every member.
    pub async fn reset(&self) -> Result<(), GridError> {
        self.cache.remove(&()).await.map(|_| ())
    }
}

/// Opens the reference `name` on `caches` (see `Grid::cached_reference`).
pub async fn open<V, F, Fut, E>(
    caches: &crate::Caches,
    name: &str,
    supplier: F,
) -> Result<CachedReference<V>, GridError>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<V, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let supplier = std::sync::Arc::new(supplier);
    let cache = crate::cache::CacheBuilder::<(), V>::new(caches, &format!("ref:{name}"))
        .loader(move |()| {
            let supplier = supplier.clone();
            async move { supplier().await.map(Some) }
        })
        .open()
        .await?;
    Ok(CachedReference::new(cache))
}
