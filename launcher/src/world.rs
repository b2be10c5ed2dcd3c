//! Who am I in the job: the one place the rank environment is read (STYLE.md point 6).
//!
//! # Precedence (a worker, [`WorkerEnv::from_vars`])
//!
//! 1. `RANK` and `WORLD_SIZE` set (by `devise-launch` or `torchrun`): `RANK`, `WORLD_SIZE`,
//!    `LOCAL_RANK` (default 0), `LOCAL_WORLD_SIZE` (default 1). Setting only one of `RANK` /
//!    `WORLD_SIZE` is an error.
//! 2. Else `SLURM_PROCID` set (plain `srun`, one task per GPU): `SLURM_PROCID` is the rank,
//!    `SLURM_NTASKS` the world size, `SLURM_LOCALID` the local rank, and the local world size is
//!    this node's (`SLURM_NODEID`) entry of `SLURM_STEP_TASKS_PER_NODE`, else of
//!    `SLURM_TASKS_PER_NODE` (`8(x2),4` means 8, 8, 4).
//! 3. Else a single process: rank 0 of 1.
//!
//! The rendezvous address: `MASTER_ADDR` / `MASTER_PORT` when set; under SLURM (case 2, or 1
//! without them) the first host of the step's node list (`SLURM_STEP_NODELIST`, else
//! `SLURM_JOB_NODELIST`) and port `10000 + SLURM_JOB_ID % 20000` (two jobs sharing a node do
//! not collide); else `127.0.0.1:29500`. Under torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`),
//! whose agent already hosts its own store on `MASTER_PORT`, devise's store uses
//! `MASTER_PORT + 1`.
//!
//! The run id (names the job in logs, keys the rendezvous): `DEVISE_RUN_ID`, else
//! `TORCHELASTIC_RUN_ID`, else `SLURM_JOB_ID`, else `local`.
//!
//! The rendezvous token (a stray or stale process without it is refused by the store):
//! `DEVISE_RDZV_TOKEN`, else derived from the run id (then anyone who knows the run id can
//! join: export a random `DEVISE_RDZV_TOKEN` in multi-node jobs; the cluster recipes do).
//!
//! The restart attempt (`DEVISE_RESTART_ATTEMPT`, else `TORCHELASTIC_RESTART_COUNT`, else 0) is
//! part of the rendezvous handshake, so workers of different attempts never join each other.
use anyhow::{bail, Context, Result};

/// Where a worker's rank came from (printed at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    /// `RANK`/`WORLD_SIZE` (devise-launch, torchrun).
    Torchrun,
    /// `SLURM_PROCID`/`SLURM_NTASKS` (srun, one task per GPU).
    Slurm,
    /// Nothing set: one process.
    Single,
}

impl std::fmt::Display for EnvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EnvSource::Torchrun => "RANK/WORLD_SIZE variables",
            EnvSource::Slurm => "SLURM_PROCID/SLURM_NTASKS variables",
            EnvSource::Single => "no rank variables: a single process",
        })
    }
}

/// A worker's place in the job. Invariants: `rank < world_size`,
/// `local_rank < local_world_size <= world_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Rank among the workers of this node; selects the GPU (`cuda:local_rank`).
    pub local_rank: usize,
    /// Number of workers in the job.
    pub world_size: usize,
    /// Number of workers on this node.
    pub local_world_size: usize,
    /// Host of the rendezvous store (rank 0's node).
    pub master_addr: String,
    /// TCP port of the rendezvous store.
    pub master_port: u16,
    /// Names the job.
    pub run_id: String,
    /// Shared secret every connection to the rendezvous store must present.
    pub token: String,
    /// Which attempt of the launcher's restart loop this is (0 first).
    pub restart_attempt: u32,
    /// Which variables the rank came from.
    pub source: EnvSource,
}

impl std::fmt::Display for WorkerEnv {
    /// `rank 3 of 8 (local 1 of 4, from RANK/WORLD_SIZE variables), rendezvous h:29500, run id x`
    /// (never the token).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} of {} (local {} of {}, from {}), rendezvous {}:{}, run id {}",
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_world_size,
            self.source,
            self.master_addr,
            self.master_port,
            self.run_id
        )
    }
}

impl WorkerEnv {
    /// [`WorkerEnv::from_vars`] over the process environment.
    pub fn from_env() -> Result<WorkerEnv> {
        WorkerEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// Resolves the environment `get` gives, in the precedence of the module docs. Errors name
    /// the variable and its value.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<WorkerEnv> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .with_context(|| format!("{k}={v:?} is not a non-negative integer")),
            }
        };
        let slurm_job = get("SLURM_JOB_ID");
        let (rank, world_size, local_rank, local_world_size, source) = match (
            num("RANK")?,
            num("WORLD_SIZE")?,
        ) {
            (Some(rank), Some(world)) => (
                rank,
                world,
                num("LOCAL_RANK")?.unwrap_or(0),
                num("LOCAL_WORLD_SIZE")?.unwrap_or(1),
                EnvSource::Torchrun,
            ),
            (Some(_), None) => bail!("RANK is set but WORLD_SIZE is not"),
            (None, Some(_)) => bail!("WORLD_SIZE is set but RANK is not"),
            (None, None) => match num("SLURM_PROCID")? {
                Some(rank) => {
                    let world = num("SLURM_NTASKS")?
                        .context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
                    let node = num("SLURM_NODEID")?.unwrap_or(0);
                    let key = if get("SLURM_STEP_TASKS_PER_NODE").is_some() {
                        "SLURM_STEP_TASKS_PER_NODE"
                    } else {
                        "SLURM_TASKS_PER_NODE"
                    };
                    let local_world = match get(key) {
                            Some(v) => tasks_on_node(&v, node).with_context(|| {
                                format!("{key}={v:?} has no entry for SLURM_NODEID {node} (expected e.g. 8 or 8(x4),4)")
                            })?,
                            None => 1,
                        };
                    (
                        rank,
                        world,
                        num("SLURM_LOCALID")?.unwrap_or(0),
                        local_world,
                        EnvSource::Slurm,
                    )
                }
                None => (0, 1, 0, 1, EnvSource::Single),
            },
        };
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is not in a world of size {world_size} (from {source})");
        }
        if local_world_size == 0 || local_rank >= local_world_size || local_world_size > world_size
        {
            bail!(
                "local_rank {local_rank} / local_world_size {local_world_size} do not fit a world of {world_size} (from {source})"
            );
        }
        let (master_addr, master_port) = match (get("MASTER_ADDR"), num("MASTER_PORT")?) {
            (Some(addr), Some(port)) => (addr, port_of(port)?),
            (addr, port) => {
                let list = [
                    "SLURM_STEP_NODELIST",
                    "SLURM_JOB_NODELIST",
                    "SLURM_NODELIST",
                ]
                .into_iter()
                .find_map(|k| get(k).map(|v| (k, v)));
                let slurm_addr = match list {
                    Some((key, list)) => {
                        Some(crate::hostlist::expand(&list).context(key)?.remove(0))
                    }
                    None => None,
                };
                let addr = addr.or(slurm_addr).unwrap_or_else(|| "127.0.0.1".into());
                let port = match (port, &slurm_job) {
                    (Some(p), _) => port_of(p)?,
                    (None, Some(job)) => slurm_default_port(job),
                    (None, None) => DEFAULT_MASTER_PORT,
                };
                (addr, port)
            }
        };
        // torchrun's agent hosts its own store on MASTER_PORT: ours takes the next port.
        let master_port = if get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True") {
            master_port.checked_add(1).context(
                "MASTER_PORT is 65535: no port after it for devise's store under torchrun",
            )?
        } else {
            master_port
        };
        let run_id = get("DEVISE_RUN_ID")
            .or_else(|| get("TORCHELASTIC_RUN_ID"))
            .or(slurm_job)
            .unwrap_or_else(|| "local".into());
        let token = get("DEVISE_RDZV_TOKEN").unwrap_or_else(|| format!("run-id:{run_id}"));
        let restart_attempt = match get("DEVISE_RESTART_ATTEMPT")
            .map(|v| ("DEVISE_RESTART_ATTEMPT", v))
            .or_else(|| {
                get("TORCHELASTIC_RESTART_COUNT").map(|v| ("TORCHELASTIC_RESTART_COUNT", v))
            }) {
            Some((k, v)) => v
                .trim()
                .parse()
                .with_context(|| format!("{k}={v:?} is not a non-negative integer"))?,
            None => 0,
        };
        Ok(WorkerEnv {
            rank,
            local_rank,
            world_size,
            local_world_size,
            master_addr,
            master_port,
            run_id,
            token,
            restart_attempt,
            source,
        })
    }
}

/// Rendezvous port outside SLURM when nothing names one (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Rendezvous port of a SLURM job: `10000 + SLURM_JOB_ID % 20000`, so two jobs sharing a node
/// do not collide, and below Linux's ephemeral port range (32768-60999), so an outgoing
/// connection never holds it. An array suffix (`1234_7`) is ignored; a job id without leading
/// digits gives 10000. Shared by workers ([`WorkerEnv::from_vars`]) and `devise-launch`, which must agree.
pub fn slurm_default_port(job_id: &str) -> u16 {
    10000 + (job_number(job_id) % 20000) as u16
}

fn port_of(p: usize) -> Result<u16> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => bail!("MASTER_PORT={p} is not a TCP port (1..=65535)"),
    }
}

/// `SLURM_JOB_ID` may carry an array suffix (`1234_7`): the digits before it.
fn job_number(job: &str) -> u64 {
    job.chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

/// Node `node`'s entry of a `SLURM_TASKS_PER_NODE` value: `8(x2),4` is 8, 8, 4.
fn tasks_on_node(v: &str, node: usize) -> Option<usize> {
    let mut seen = 0;
    for part in v.split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')')?.trim().parse::<usize>().ok()?),
            None => (part, 1),
        };
        let count: usize = count.trim().parse().ok().filter(|&n| n > 0)?;
        if node < seen + repeat {
            return Some(count);
        }
        seen += repeat;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<WorkerEnv> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorkerEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_win_over_slurm() {
        let w = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_ID", "99"),
        ])
        .unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.local_rank, w.local_world_size),
            (3, 8, 1, 2)
        );
        assert_eq!((w.master_addr.as_str(), w.master_port), ("10.0.0.1", 1234));
        assert_eq!(w.source, EnvSource::Torchrun);
        assert_eq!(w.run_id, "99");
    }

    #[test]
    fn plain_srun_one_task_per_gpu() {
        let w = env(&[
            ("SLURM_PROCID", "13"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("SLURM_TASKS_PER_NODE", "8(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[01-04,07]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.local_rank, w.local_world_size),
            (13, 16, 5, 8)
        );
        assert_eq!(w.master_addr, "gpu01");
        assert_eq!(w.master_port, 10000 + (123456 % 20000) as u16);
        assert_eq!(w.source, EnvSource::Slurm);
        assert_eq!(w.token, "run-id:123456");
    }

    #[test]
    fn slurm_port_formula() {
        assert_eq!(slurm_default_port("77"), 10077);
        assert_eq!(slurm_default_port("123456"), 13456);
        assert_eq!(slurm_default_port("40000_3"), 10000);
        assert_eq!(slurm_default_port("x"), 10000);
    }

    #[test]
    fn step_variables_win_and_uneven_nodes_get_their_own_task_count() {
        let w = env(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "12"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_TASKS_PER_NODE", "8(x4)"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2),4"),
            ("SLURM_JOB_NODELIST", "gpu[01-04]"),
            ("SLURM_STEP_NODELIST", "gpu[03-04,01]"),
            ("SLURM_JOB_ID", "5"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.local_rank, w.local_world_size), (9, 1, 4));
        assert_eq!(w.master_addr, "gpu03");
        assert_eq!(tasks_on_node("8(x2),4", 0), Some(8));
        assert_eq!(tasks_on_node("8(x2),4", 1), Some(8));
        assert_eq!(tasks_on_node("8(x2),4", 2), Some(4));
        assert_eq!(tasks_on_node("8(x2),4", 3), None);
        assert_eq!(tasks_on_node("4,8", 1), Some(8));
        assert_eq!(tasks_on_node("x", 0), None);
    }

    #[test]
    fn under_torchrun_our_store_takes_the_port_after_the_agents() {
        let w = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RUN_ID", "none"),
        ])
        .unwrap();
        assert_eq!(w.master_port, 29501);
        assert_eq!(w.run_id, "none");
    }

    #[test]
    fn nothing_set_is_a_single_process() {
        let w = env(&[]).unwrap();
        assert_eq!((w.rank, w.world_size, w.source), (0, 1, EnvSource::Single));
        assert_eq!(
            (w.master_addr.as_str(), w.master_port),
            ("127.0.0.1", 29500)
        );
    }

    #[test]
    fn inconsistent_variables_are_errors_naming_them() {
        let e = env(&[("RANK", "2")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE"), "{e}");
        let e = env(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2"), "{e}");
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "gpu[01"),
        ])
        .unwrap_err();
        assert!(format!("{e:#}").contains("SLURM_JOB_NODELIST"), "{e:#}");
    }
}
