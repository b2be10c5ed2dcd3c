//! The launcher's view of the job: how many nodes, which one this is, how many workers per
//! node, where the rendezvous store listens, what the run is called; and the environment each
//! worker is started with. Pure functions over a variable getter, so tests simulate SLURM.
//!
//! # Precedence (each value on its own)
//!
//! An explicit flag always wins. Else, under SLURM (`SLURM_JOB_ID` set and not empty):
//!
//! | value            | SLURM source                                          | default        |
//! |------------------|-------------------------------------------------------|----------------|
//! | `nnodes`         | `SLURM_STEP_NUM_NODES`, `SLURM_JOB_NUM_NODES`, `SLURM_NNODES` | 1        |
//! | `node_rank`      | `SLURM_NODEID`                                        | 0              |
//! | `nproc_per_node` | `SLURM_GPUS_ON_NODE`, else `CUDA_VISIBLE_DEVICES` count | 1            |
//! | `master_addr`    | first host of `SLURM_STEP_NODELIST`, `SLURM_JOB_NODELIST`, `SLURM_NODELIST` | `127.0.0.1` |
//! | `master_port`    | `10000 + SLURM_JOB_ID % 20000` (as workers compute it) | 29500         |
//! | `run_id`         | `SLURM_JOB_ID`                                        | `local-<pid>-<unix time>` |
//!
//! Outside SLURM only `CUDA_VISIBLE_DEVICES` (its entry count) is read; the rest is flag or
//! default. A multi-node world needs a rendezvous address and run id every node agrees on, so
//! `nnodes > 1` without SLURM requires `--master-addr` and `--run-id` (the defaults would point
//! each node at itself, and give each node its own run id); under SLURM without a node list it
//! requires `--master-addr`. One launcher per node: under SLURM a `SLURM_LOCALID` above 0 (srun
//! started several tasks per node, which would all claim the same ranks) is an error unless
//! `--node-rank` is given.
//!
//! # What crosses to the workers ([`World::worker_env`])
//!
//! `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`, `DEVISE_RUN_ID`, `DEVISE_RESTART_ATTEMPT`, and `DEVISE_RDZV_TOKEN` when the
//! launcher has one ([`Token`]). These are exactly what `devise_launch::world::WorkerEnv` reads
//! first, so inherited `SLURM_*` / `TORCHELASTIC_*` variables cannot override them.
//!
//! # Errors
//!
//! Every error names the flag or variable and the offending value (`main` exits 2). Empty
//! variables count as unset, as in `world.rs`.
use anyhow::{bail, Context, Result};
use devise_launch::world::{slurm_default_port, visible_gpu_count, DEFAULT_MASTER_PORT};
use std::fmt;

/// What the command line said (`None`: not given).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--nproc-per-node`.
    pub nproc_per_node: Option<usize>,
    /// `--nnodes`.
    pub nnodes: Option<usize>,
    /// `--node-rank`.
    pub node_rank: Option<usize>,
    /// `--master-addr`.
    pub master_addr: Option<String>,
    /// `--master-port`.
    pub master_port: Option<u16>,
    /// `--run-id`.
    pub run_id: Option<String>,
}

/// Where a resolved value came from (printed by `--dry-run`, named in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag (`--nnodes`).
    Flag(&'static str),
    /// An environment variable, used as is (or its first host / entry count).
    Env(&'static str),
    /// Computed from a variable by a documented formula.
    Formula(&'static str),
    /// Nothing said anything.
    Default,
    /// Under SLURM, none of these variables was set: the default.
    DefaultUnset(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(s) | Source::Env(s) | Source::Formula(s) => f.write_str(s),
            Source::Default => f.write_str("default"),
            Source::DefaultUnset(vars) => write!(f, "default: {vars} unset"),
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// Its origin.
    pub source: Source,
}

fn sourced<T>(value: T, source: Source) -> Sourced<T> {
    Sourced { value, source }
}

/// The resolved world of this launcher. Invariants (checked by [`resolve`]): `nnodes >= 1`,
/// `node_rank < nnodes`, `nproc_per_node >= 1`, `nnodes * nproc_per_node` fits in `usize`.
#[derive(Debug, Clone)]
pub struct World {
    /// Nodes in the job (one launcher each).
    pub nnodes: Sourced<usize>,
    /// This node's index, `0..nnodes`.
    pub node_rank: Sourced<usize>,
    /// Workers started on this node (one per GPU).
    pub nproc_per_node: Sourced<usize>,
    /// Host of the rendezvous store (node rank 0).
    pub master_addr: Sourced<String>,
    /// TCP port of the rendezvous store.
    pub master_port: Sourced<u16>,
    /// Names the job; keys the rendezvous.
    pub run_id: Sourced<String>,
}

impl World {
    /// Workers in the whole job.
    pub fn world_size(&self) -> usize {
        self.nnodes.value * self.nproc_per_node.value
    }

    /// Global rank of local worker `local_rank`.
    pub fn rank_of(&self, local_rank: usize) -> usize {
        self.node_rank.value * self.nproc_per_node.value + local_rank
    }

    /// The one-line start-up summary.
    pub fn summary(&self) -> String {
        let first = self.rank_of(0);
        let last = self.rank_of(self.nproc_per_node.value - 1);
        format!(
            "nnodes={} node_rank={} nproc_per_node={} world_size={} local ranks {first}-{last} master={}:{} run_id={}",
            self.nnodes.value,
            self.node_rank.value,
            self.nproc_per_node.value,
            self.world_size(),
            self.master_addr.value,
            self.master_port.value,
            self.run_id.value,
        )
    }

    /// The `--dry-run` description: one `key = value (from source)` line per value.
    pub fn describe(&self, token: &Token) -> Vec<String> {
        vec![
            format!(
                "nnodes = {} (from {})",
                self.nnodes.value, self.nnodes.source
            ),
            format!(
                "node_rank = {} (from {})",
                self.node_rank.value, self.node_rank.source
            ),
            format!(
                "nproc_per_node = {} (from {})",
                self.nproc_per_node.value, self.nproc_per_node.source
            ),
            format!(
                "world_size = {} (nnodes x nproc_per_node)",
                self.world_size()
            ),
            format!(
                "master = {}:{} (addr from {}, port from {})",
                self.master_addr.value,
                self.master_port.value,
                self.master_addr.source,
                self.master_port.source
            ),
            format!(
                "run_id = {} (from {})",
                self.run_id.value, self.run_id.source
            ),
            format!("rdzv_token: {}", token.describe()),
        ]
    }

    /// The variables local worker `local_rank` of restart attempt `attempt` is started with
    /// (on top of the launcher's own environment, which it inherits).
    pub fn worker_env(
        &self,
        local_rank: usize,
        attempt: u32,
        token: &Token,
    ) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("RANK", self.rank_of(local_rank).to_string()),
            ("LOCAL_RANK", local_rank.to_string()),
            ("WORLD_SIZE", self.world_size().to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc_per_node.value.to_string()),
            ("GROUP_RANK", self.node_rank.value.to_string()),
            ("MASTER_ADDR", self.master_addr.value.clone()),
            ("MASTER_PORT", self.master_port.value.to_string()),
            ("DEVISE_RUN_ID", self.run_id.value.clone()),
            ("DEVISE_RESTART_ATTEMPT", attempt.to_string()),
        ];
        if let Some(t) = token.value() {
            env.push(("DEVISE_RDZV_TOKEN", t.to_string()));
        }
        env
    }
}

/// The rendezvous token the workers get (`DEVISE_RDZV_TOKEN`): one per launcher invocation,
/// the same across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `DEVISE_RDZV_TOKEN` was in the launcher's environment: passed through.
    Inherited(String),
    /// Single node, no token given: a random 128-bit hex token made for this launch.
    Generated(String),
    /// Several nodes and no token: not set; each worker derives it from the run id (the other
    /// nodes' launchers could not know a random one). The caller warns.
    DerivedByWorkers,
}

impl Token {
    /// Chooses the token: inherited, else generated by `random` when `nnodes == 1`, else left
    /// to the workers.
    pub fn choose(
        get: impl Fn(&str) -> Option<String>,
        nnodes: usize,
        random: impl FnOnce() -> Result<String>,
    ) -> Result<Token> {
        if let Some(t) = get("DEVISE_RDZV_TOKEN").filter(|t| !t.trim().is_empty()) {
            return Ok(Token::Inherited(t));
        }
        if nnodes == 1 {
            return Ok(Token::Generated(random()?));
        }
        Ok(Token::DerivedByWorkers)
    }

    /// The value workers get, if any.
    pub fn value(&self) -> Option<&str> {
        match self {
            Token::Inherited(t) | Token::Generated(t) => Some(t),
            Token::DerivedByWorkers => None,
        }
    }

    /// Where the token comes from, without revealing it.
    pub fn describe(&self) -> &'static str {
        match self {
            Token::Inherited(_) => "passed through from DEVISE_RDZV_TOKEN",
            Token::Generated(_) => "random, generated for this launch (same across restarts)",
            Token::DerivedByWorkers => "not set: workers derive it from the run id",
        }
    }
}

/// Resolves the world from `flags`, the variables `get` gives and, for the default run id,
/// `local_run_id` (called only when needed), in the precedence of the module docs.
pub fn resolve(
    flags: &Flags,
    get: impl Fn(&str) -> Option<String>,
    local_run_id: impl FnOnce() -> String,
) -> Result<World> {
    let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
    let num = |k: &'static str| -> Result<Option<Sourced<usize>>> {
        match get(k) {
            None => Ok(None),
            Some(v) => {
                let n = v
                    .trim()
                    .parse::<usize>()
                    .with_context(|| format!("{k}={v:?} is not a non-negative integer"))?;
                Ok(Some(sourced(n, Source::Env(k))))
            }
        }
    };
    let slurm_job = get("SLURM_JOB_ID");
    let slurm = slurm_job.is_some();

    let nnodes = match flags.nnodes {
        Some(n) => sourced(n, Source::Flag("--nnodes")),
        // The step's nodes first: `srun -N2` inside a 4-node allocation runs on 2.
        None if slurm => match num("SLURM_STEP_NUM_NODES")? {
            Some(n) => n,
            None => match num("SLURM_JOB_NUM_NODES")? {
                Some(n) => n,
                None => num("SLURM_NNODES")?.unwrap_or(sourced(
                    1,
                    Source::DefaultUnset(
                        "SLURM_STEP_NUM_NODES, SLURM_JOB_NUM_NODES and SLURM_NNODES",
                    ),
                )),
            },
        },
        None => sourced(1, Source::Default),
    };
    if nnodes.value == 0 {
        bail!(
            "nnodes is 0 (from {}): it must be at least 1",
            nnodes.source
        );
    }

    let node_rank = match flags.node_rank {
        Some(n) => sourced(n, Source::Flag("--node-rank")),
        None if slurm => {
            if let Some(local) = num("SLURM_LOCALID")? {
                if local.value > 0 {
                    bail!(
                        "SLURM_LOCALID={}: srun started several devise-launch tasks on this node \
                         (they would all claim the same ranks); start one per node \
                         (srun --ntasks-per-node=1), it starts the per-GPU workers itself",
                        local.value
                    );
                }
            }
            num("SLURM_NODEID")?.unwrap_or(sourced(0, Source::Default))
        }
        None => sourced(0, Source::Default),
    };
    if node_rank.value >= nnodes.value {
        bail!(
            "node rank {} (from {}) is not below nnodes {} (from {})",
            node_rank.value,
            node_rank.source,
            nnodes.value,
            nnodes.source
        );
    }

    let nproc_per_node = match flags.nproc_per_node {
        Some(n) => sourced(n, Source::Flag("--nproc-per-node")),
        None => {
            let from_slurm = if slurm {
                num("SLURM_GPUS_ON_NODE")?
            } else {
                None
            };
            match from_slurm {
                Some(n) => n,
                None => match get("CUDA_VISIBLE_DEVICES").map(|v| visible_gpu_count(&v)) {
                    Some(n) if n > 0 => sourced(n, Source::Env("CUDA_VISIBLE_DEVICES")),
                    _ => sourced(1, Source::Default),
                },
            }
        }
    };
    if nproc_per_node.value == 0 {
        bail!(
            "nproc-per-node is 0 (from {}): it must be at least 1",
            nproc_per_node.source
        );
    }
    if nnodes.value.checked_mul(nproc_per_node.value).is_none() {
        bail!(
            "nnodes {} (from {}) x nproc-per-node {} (from {}) overflows",
            nnodes.value,
            nnodes.source,
            nproc_per_node.value,
            nproc_per_node.source
        );
    }

    let master_addr = match &flags.master_addr {
        Some(a) if a.trim().is_empty() => bail!("--master-addr is empty"),
        Some(a) => sourced(a.trim().to_string(), Source::Flag("--master-addr")),
        None => {
            let list = if slurm {
                get("SLURM_STEP_NODELIST")
                    .map(|l| ("SLURM_STEP_NODELIST", l))
                    .or_else(|| get("SLURM_JOB_NODELIST").map(|l| ("SLURM_JOB_NODELIST", l)))
                    .or_else(|| get("SLURM_NODELIST").map(|l| ("SLURM_NODELIST", l)))
            } else {
                None
            };
            match list {
                Some((var, list)) => {
                    let hosts = devise_launch::hostlist::expand(&list)
                        .with_context(|| format!("{var}={list:?} is not a valid SLURM hostlist"))?;
                    // `expand` never returns an empty list; stay total anyway.
                    let first = hosts
                        .into_iter()
                        .next()
                        .with_context(|| format!("{var}={list:?} names no host"))?;
                    sourced(first, Source::Env(var))
                }
                None if nnodes.value > 1 && slurm => bail!(
                    "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: pass --master-addr \
                     (the host of node rank 0) for nnodes {} (from {})",
                    nnodes.value,
                    nnodes.source
                ),
                None if nnodes.value > 1 => bail!(
                    "nnodes {} (from {}) without SLURM needs --master-addr, the host of node \
                     rank 0 (the default 127.0.0.1 would point every node at itself)",
                    nnodes.value,
                    nnodes.source
                ),
                None => sourced("127.0.0.1".to_string(), Source::Default),
            }
        }
    };

    let master_port = match (flags.master_port, &slurm_job) {
        (Some(0), _) => bail!("--master-port 0 is not a TCP port (1..=65535)"),
        (Some(p), _) => sourced(p, Source::Flag("--master-port")),
        (None, Some(job)) => sourced(
            slurm_default_port(job),
            Source::Formula("10000 + SLURM_JOB_ID % 20000"),
        ),
        (None, None) => sourced(DEFAULT_MASTER_PORT, Source::Default),
    };

    let run_id = match (&flags.run_id, slurm_job) {
        (Some(id), _) if id.trim().is_empty() => bail!("--run-id is empty"),
        (Some(id), _) => sourced(id.trim().to_string(), Source::Flag("--run-id")),
        (None, Some(job)) => sourced(job.trim().to_string(), Source::Env("SLURM_JOB_ID")),
        (None, None) if nnodes.value > 1 => bail!(
            "nnodes {} (from {}) without SLURM needs --run-id, the same on every node (the \
             default is made up per launcher)",
            nnodes.value,
            nnodes.source
        ),
        (None, None) => sourced(local_run_id(), Source::Default),
    };

    Ok(World {
        nnodes,
        node_rank,
        nproc_per_node,
        master_addr,
        master_port,
        run_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(flags: &Flags, pairs: &[(&str, &str)]) -> Result<World> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(flags, |k| map.get(k).cloned(), || "local-test".into())
    }

    fn err(flags: &Flags, pairs: &[(&str, &str)]) -> String {
        format!("{:#}", world(flags, pairs).unwrap_err())
    }

    const SLURM_2X2: &[(&str, &str)] = &[
        ("SLURM_JOB_ID", "77"),
        ("SLURM_JOB_NUM_NODES", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[01-02]"),
        ("SLURM_GPUS_ON_NODE", "2"),
    ];

    #[test]
    fn defaults_outside_slurm() {
        let w = world(&Flags::default(), &[]).unwrap();
        assert_eq!(
            (w.nnodes.value, w.node_rank.value, w.nproc_per_node.value),
            (1, 0, 1)
        );
        assert_eq!(w.master_addr.value, "127.0.0.1");
        assert_eq!(w.master_port.value, 29500);
        assert_eq!(w.run_id, sourced("local-test".to_string(), Source::Default));
        assert_eq!(w.nnodes.source, Source::Default);
    }

    #[test]
    fn cuda_visible_devices_sets_nproc_outside_slurm() {
        let w = world(&Flags::default(), &[("CUDA_VISIBLE_DEVICES", "0,1,3")]).unwrap();
        assert_eq!(
            w.nproc_per_node,
            sourced(3, Source::Env("CUDA_VISIBLE_DEVICES"))
        );
        // SLURM_GPUS_ON_NODE means nothing without SLURM_JOB_ID.
        let w = world(&Flags::default(), &[("SLURM_GPUS_ON_NODE", "4")]).unwrap();
        assert_eq!(w.nproc_per_node.value, 1);
        assert_eq!(visible_gpu_count("0,1,-1,2"), 2);
        assert_eq!(visible_gpu_count("NoDevFiles"), 0);
        assert_eq!(visible_gpu_count("GPU-0a1b,GPU-2c3d"), 2);
        let w = world(&Flags::default(), &[("CUDA_VISIBLE_DEVICES", "-1")]).unwrap();
        assert_eq!(w.nproc_per_node, sourced(1, Source::Default));
    }

    #[test]
    fn slurm_needs_no_flags() {
        let w = world(&Flags::default(), SLURM_2X2).unwrap();
        assert_eq!(w.nnodes, sourced(2, Source::Env("SLURM_JOB_NUM_NODES")));
        assert_eq!(w.node_rank, sourced(1, Source::Env("SLURM_NODEID")));
        assert_eq!(
            w.nproc_per_node,
            sourced(2, Source::Env("SLURM_GPUS_ON_NODE"))
        );
        assert_eq!(
            w.master_addr,
            sourced("gpu01".to_string(), Source::Env("SLURM_JOB_NODELIST"))
        );
        assert_eq!(w.master_port.value, 10077);
        assert_eq!(
            w.run_id,
            sourced("77".to_string(), Source::Env("SLURM_JOB_ID"))
        );
        assert_eq!(w.world_size(), 4);
        assert_eq!((w.rank_of(0), w.rank_of(1)), (2, 3));
    }

    #[test]
    fn slurm_fallbacks() {
        // SLURM_NNODES, SLURM_NODELIST, CUDA_VISIBLE_DEVICES when the preferred ones are unset.
        let w = world(
            &Flags::default(),
            &[
                ("SLURM_JOB_ID", "5_3"),
                ("SLURM_NNODES", "3"),
                ("SLURM_NODEID", "2"),
                ("SLURM_NODELIST", "n[7-9]"),
                ("CUDA_VISIBLE_DEVICES", "0,1,2,3"),
            ],
        )
        .unwrap();
        assert_eq!(w.nnodes, sourced(3, Source::Env("SLURM_NNODES")));
        assert_eq!(
            w.master_addr,
            sourced("n7".to_string(), Source::Env("SLURM_NODELIST"))
        );
        assert_eq!(
            w.nproc_per_node,
            sourced(4, Source::Env("CUDA_VISIBLE_DEVICES"))
        );
        assert_eq!(w.master_port.value, 10005);
        assert_eq!(w.run_id.value, "5_3");
        // Single-node allocation without a node list: localhost is right.
        let w = world(&Flags::default(), &[("SLURM_JOB_ID", "9")]).unwrap();
        assert_eq!(
            w.master_addr,
            sourced("127.0.0.1".to_string(), Source::Default)
        );
    }

    #[test]
    fn flags_override_slurm() {
        let flags = Flags {
            nproc_per_node: Some(1),
            nnodes: Some(4),
            node_rank: Some(3),
            master_addr: Some("10.0.0.1".into()),
            master_port: Some(1234),
            run_id: Some("mine".into()),
        };
        let mut env = SLURM_2X2.to_vec();
        env.push(("SLURM_LOCALID", "1")); // --node-rank given: the one-task-per-node guard is off
        let w = world(&flags, &env).unwrap();
        assert_eq!(w.nnodes, sourced(4, Source::Flag("--nnodes")));
        assert_eq!(w.node_rank, sourced(3, Source::Flag("--node-rank")));
        assert_eq!(
            w.nproc_per_node,
            sourced(1, Source::Flag("--nproc-per-node"))
        );
        assert_eq!(w.master_addr.value, "10.0.0.1");
        assert_eq!(w.master_port, sourced(1234, Source::Flag("--master-port")));
        assert_eq!(w.run_id.value, "mine");
        // A flag that replaces the node list means a malformed list is never read.
        let flags = Flags {
            master_addr: Some("h0".into()),
            ..Flags::default()
        };
        let w = world(
            &flags,
            &[("SLURM_JOB_ID", "1"), ("SLURM_JOB_NODELIST", "gpu[01")],
        )
        .unwrap();
        assert_eq!(w.master_addr.value, "h0");
    }

    #[test]
    fn errors_name_the_flag_or_variable() {
        let mut env = SLURM_2X2.to_vec();
        env.retain(|(k, _)| *k != "SLURM_NODEID");
        env.push(("SLURM_NODEID", "2"));
        let e = err(&Flags::default(), &env);
        assert!(
            e.contains("SLURM_NODEID") && e.contains("SLURM_JOB_NUM_NODES"),
            "{e}"
        );

        let e = err(
            &Flags {
                node_rank: Some(1),
                ..Flags::default()
            },
            &[],
        );
        assert!(
            e.contains("--node-rank") && e.contains("nnodes 1 (from default)"),
            "{e}"
        );

        let e = err(
            &Flags::default(),
            &[("SLURM_JOB_ID", "1"), ("SLURM_NODEID", "x")],
        );
        assert!(e.contains("SLURM_NODEID=\"x\""), "{e}");

        let e = err(
            &Flags::default(),
            &[("SLURM_JOB_ID", "1"), ("SLURM_GPUS_ON_NODE", "0")],
        );
        assert!(e.contains("SLURM_GPUS_ON_NODE"), "{e}");

        let e = err(
            &Flags {
                nproc_per_node: Some(0),
                ..Flags::default()
            },
            &[],
        );
        assert!(e.contains("--nproc-per-node"), "{e}");

        let e = err(
            &Flags {
                nnodes: Some(0),
                ..Flags::default()
            },
            &[],
        );
        assert!(e.contains("--nnodes"), "{e}");

        let e = err(
            &Flags::default(),
            &[("SLURM_JOB_ID", "1"), ("SLURM_LOCALID", "1")],
        );
        assert!(e.contains("SLURM_LOCALID=1"), "{e}");

        let mut env = SLURM_2X2.to_vec();
        env.retain(|(k, _)| *k != "SLURM_JOB_NODELIST");
        let e = err(&Flags::default(), &env);
        assert!(
            e.contains("SLURM_JOB_NODELIST") && e.contains("--master-addr"),
            "{e}"
        );
    }

    #[test]
    fn multi_node_without_slurm_needs_addr_and_run_id() {
        let two = Flags {
            nnodes: Some(2),
            ..Flags::default()
        };
        assert!(err(&two, &[]).contains("--master-addr"));
        let with_addr = Flags {
            master_addr: Some("h0".into()),
            ..two.clone()
        };
        assert!(err(&with_addr, &[]).contains("--run-id"));
        let ok = Flags {
            run_id: Some("r1".into()),
            ..with_addr
        };
        assert_eq!(world(&ok, &[]).unwrap().world_size(), 2);
    }

    #[test]
    fn malformed_nodelists_are_errors_naming_the_variable() {
        for bad in ["gpu[01", "gpu[]", "a,,b", "gpu[3-1]", "gpu 01", "x]"] {
            let e = err(
                &Flags::default(),
                &[("SLURM_JOB_ID", "1"), ("SLURM_JOB_NODELIST", bad)],
            );
            assert!(e.contains("SLURM_JOB_NODELIST"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn worker_env_and_token() {
        let w = world(&Flags::default(), SLURM_2X2).unwrap();
        let env: HashMap<_, _> = w
            .worker_env(1, 2, &Token::Generated("ab".into()))
            .into_iter()
            .collect();
        for (k, v) in [
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "gpu01"),
            ("MASTER_PORT", "10077"),
            ("DEVISE_RUN_ID", "77"),
            ("DEVISE_RESTART_ATTEMPT", "2"),
            ("DEVISE_RDZV_TOKEN", "ab"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        let env = w.worker_env(0, 0, &Token::DerivedByWorkers);
        assert!(env.iter().all(|(k, _)| *k != "DEVISE_RDZV_TOKEN"));

        // What the worker reads back is what the launcher meant.
        let wenv: HashMap<String, String> = w
            .worker_env(1, 2, &Token::Inherited("t".into()))
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain([("SLURM_PROCID".to_string(), "0".to_string())])
            .collect();
        let back = devise_launch::world::WorkerEnv::from_vars(|k| wenv.get(k).cloned()).unwrap();
        assert_eq!((back.rank, back.world_size, back.local_rank), (3, 4, 1));
        assert_eq!((back.master_port, back.restart_attempt), (10077, 2));
        assert_eq!(back.token, "t");

        let none = |_: &str| None::<String>;
        let rnd = || Ok("r".to_string());
        assert_eq!(
            Token::choose(none, 1, rnd).unwrap(),
            Token::Generated("r".into())
        );
        assert_eq!(
            Token::choose(none, 2, rnd).unwrap(),
            Token::DerivedByWorkers
        );
        let set = |k: &str| (k == "DEVISE_RDZV_TOKEN").then(|| "s".to_string());
        assert_eq!(
            Token::choose(set, 2, rnd).unwrap(),
            Token::Inherited("s".into())
        );
    }

    /// The variables [`resolve`] reads.
    const VARS: &[&str] = &[
        "SLURM_JOB_ID",
        "SLURM_STEP_NUM_NODES",
        "SLURM_JOB_NUM_NODES",
        "SLURM_NNODES",
        "SLURM_LOCALID",
        "SLURM_NODEID",
        "SLURM_GPUS_ON_NODE",
        "CUDA_VISIBLE_DEVICES",
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
    ];

    proptest::proptest! {
        /// One variable of a working environment (a 2-node SLURM job, or none) set to arbitrary
        /// Unicode: no panic, and a refusal names that variable.
        #[test]
        fn one_arbitrary_variable_is_refused_by_name(
            slurm in proptest::bool::ANY,
            var in proptest::sample::select(VARS),
            value in proptest::prop_oneof![
                proptest::arbitrary::any::<String>(),
                "[0-9]{1,20}",
                "[a-z0-9\\[\\],-]{0,12}",
            ],
        ) {
            let mut env: Vec<(&str, &str)> = if slurm { SLURM_2X2.to_vec() } else { Vec::new() };
            env.retain(|(k, _)| k != &var);
            env.push((var, value.as_str()));
            if let Err(e) = world(&Flags::default(), &env) {
                let e = format!("{e:#}");
                proptest::prop_assert!(e.contains(var), "{var}={value:?}: {e}");
            }
        }

        /// Any DEVISE_RDZV_TOKEN is passed through as it is, unless blank.
        #[test]
        fn any_token_is_passed_through(
            token in proptest::arbitrary::any::<String>(),
            nnodes in 1usize..4,
        ) {
            let get = |k: &str| (k == "DEVISE_RDZV_TOKEN").then(|| token.clone());
            let chosen = Token::choose(get, nnodes, || Ok("r".to_string())).unwrap();
            if token.trim().is_empty() {
                proptest::prop_assert!(!matches!(chosen, Token::Inherited(_)));
            } else {
                proptest::prop_assert_eq!(chosen, Token::Inherited(token.clone()));
            }
        }
    }

    /// Field case B22: every hostlist of the shared corpus resolves the master address to its
    /// first expected host; invalid inputs (if the file lists any) are errors naming the
    /// variable.
    #[test]
    fn b22_hostlists_give_the_first_host_as_master() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/field-cases/B22_hostlists.json"
        );
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("{path}: {e} (CI=true: the shared field cases must be present)")
            }
            Err(e) => {
                println!("SKIP: {path}: {e}");
                return;
            }
        };
        let doc: serde_json::Value = serde_json::from_str(&text).expect("B22 is JSON");
        let obj = doc.as_object().expect("B22 is a JSON object");
        let mut checked = 0;
        for (key, value) in obj {
            match key.as_str() {
                "cases" => {
                    for (list, hosts) in value.as_object().expect("cases is an object") {
                        let first = hosts[0].as_str().expect("hosts are strings");
                        let n = hosts
                            .as_array()
                            .expect("hosts is an array")
                            .len()
                            .to_string();
                        let env = [
                            ("SLURM_JOB_ID", "1"),
                            ("SLURM_JOB_NUM_NODES", n.as_str()),
                            ("SLURM_NODEID", "0"),
                            ("SLURM_JOB_NODELIST", list.as_str()),
                        ];
                        let w = world(&Flags::default(), &env)
                            .unwrap_or_else(|e| panic!("{list:?}: {e:#}"));
                        assert_eq!(w.master_addr.value, first, "{list:?}");
                        assert_eq!(w.master_addr.source, Source::Env("SLURM_JOB_NODELIST"));
                        checked += 1;
                    }
                }
                "invalid" | "malformed" | "errors" | "invalid_cases" => {
                    let lists: Vec<&str> = match value {
                        serde_json::Value::Array(a) => {
                            a.iter().filter_map(|v| v.as_str()).collect()
                        }
                        serde_json::Value::Object(o) => o.keys().map(String::as_str).collect(),
                        _ => panic!("B22 {key}: expected an array or object"),
                    };
                    for list in lists {
                        let e = err(
                            &Flags::default(),
                            &[("SLURM_JOB_ID", "1"), ("SLURM_JOB_NODELIST", list)],
                        );
                        assert!(e.contains("SLURM_JOB_NODELIST"), "{list:?}: {e}");
                        checked += 1;
                    }
                }
                "master_addr_rule" => assert_eq!(
                    value.as_str(),
                    Some("first element of the expansion"),
                    "B22's rule changed: revisit resolve()"
                ),
                "note" => {}
                other => panic!("B22 has a key this test does not know: {other:?}; extend it"),
            }
        }
        assert!(checked > 0, "B22 has no cases");
    }
}
