//! Who am I in the job: the one place the rank environment is read.
//!
//! # Precedence (a worker, [`WorkerEnv::from_vars`])
//!
//! 1. `RANK` and `WORLD_SIZE` set (by `devise-launch` or `torchrun`): `RANK`, `WORLD_SIZE`,
//!    `LOCAL_RANK` (default 0), `LOCAL_WORLD_SIZE` (default 1). Setting only one of `RANK` /
//!    `WORLD_SIZE` is an error.
//! 2. Else `SLURM_PROCID` set (plain `srun`, one task per GPU):
//!    - rank: `SLURM_PROCID`;
//!    - world size: the step's `SLURM_STEP_NUM_TASKS`, else the job's `SLURM_NTASKS` (a step
//!      may run fewer tasks than the job, and then only the step's count is right);
//!    - local world size (tasks on this node), the first of: this node's (`SLURM_NODEID`) entry
//!      of `SLURM_STEP_TASKS_PER_NODE` (`2(x3),1` means 2, 2, 2, 1); the number of entries of
//!      `SLURM_GTIDS` (the step's task ids on this node); this node's entry of
//!      `SLURM_TASKS_PER_NODE`; `SLURM_NTASKS_PER_NODE` when it times `SLURM_STEP_NUM_NODES`
//!      gives the world size (it is the job's `--ntasks-per-node` and stays set in a smaller
//!      step); the world size when `SLURM_STEP_NUM_NODES` is 1; 1 when it equals the world
//!      size. Otherwise an error naming what is missing;
//!    - local rank: `SLURM_LOCALID` (may be unset only when the task is alone on its node).
//!
//!    srun sets all of these for every task (checked against SLURM 22.05). The batch script
//!    itself also has `SLURM_PROCID=0`, but none of the step variables (`SLURM_STEP_ID`,
//!    `SLURM_STEP_NUM_TASKS`): there it is a single process (rank 0 of 1) when the job has one
//!    task, and an error when it has several (the tasks must be started with srun).
//! 3. Else a single process, rank 0 of 1, unless something says this process is one of several
//!    (`LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `SLURM_LOCALID`, or a SLURM job of more
//!    than one task: `SLURM_STEP_NUM_TASKS` / `SLURM_NTASKS` above 1): then an error, never a
//!    silent "rank 0 of 1". `RANK=0 WORLD_SIZE=1` runs one process anyway.
//!
//! Which variable gave each value is kept ([`WorkerEnv::read_from`]) and printed at start-up.
//!
//! The GPU of a worker: [`cuda_ordinal`] (its position in its `CUDA_VISIBLE_DEVICES` list).
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
//!
//! Every error names the variable and its value. Empty variables count as unset.
use anyhow::{bail, Context, Result};

/// Where a worker's rank came from (printed at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    /// `RANK`/`WORLD_SIZE` (devise-launch, torchrun).
    Torchrun,
    /// `SLURM_PROCID` and the step's task counts (srun, one task per GPU).
    Slurm,
    /// The batch script of a one-task SLURM job (`SLURM_PROCID=0`, no step variables).
    SlurmBatch,
    /// Nothing set: one process.
    Single,
}

impl std::fmt::Display for EnvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EnvSource::Torchrun => "RANK/WORLD_SIZE variables",
            EnvSource::Slurm => "SLURM task variables",
            EnvSource::SlurmBatch => "the batch script of a one-task SLURM job",
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
    /// Rank among the workers of this node; selects the GPU ([`cuda_ordinal`]).
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
    /// `(value, where it came from)` for each rank value read from a variable, in the order
    /// read: `("world_size", "SLURM_STEP_NUM_TASKS")`, `("local_world_size", "SLURM_GTIDS")`.
    pub read_from: Vec<(&'static str, &'static str)>,
}

impl std::fmt::Display for WorkerEnv {
    /// `rank 3 of 8 (local 1 of 4, from SLURM task variables: rank from SLURM_PROCID, ...),
    /// rendezvous h:29500, run id x` (never the token).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} of {} (local {} of {}, from {}{}), rendezvous {}:{}, run id {}",
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_world_size,
            self.source,
            read_list(&self.read_from),
            self.master_addr,
            self.master_port,
            self.run_id
        )
    }
}

/// `: rank from SLURM_PROCID, world_size from SLURM_NTASKS` (empty when nothing was read).
fn read_list(read_from: &[(&str, &str)]) -> String {
    if read_from.is_empty() {
        return String::new();
    }
    let items: Vec<String> = read_from
        .iter()
        .map(|(value, var)| format!("{value} from {var}"))
        .collect();
    format!(": {}", items.join(", "))
}

/// The variables a getter gives, empty ones counted as unset.
struct Vars<F: Fn(&str) -> Option<String>>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    fn get(&self, k: &str) -> Option<String> {
        (self.0)(k).filter(|v| !v.trim().is_empty())
    }

    fn num(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .with_context(|| format!("{k}={v:?} is not a non-negative integer")),
        }
    }
}

/// The rank values and where they came from.
struct Ranks {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    local_world_size: usize,
    source: EnvSource,
    read_from: Vec<(&'static str, &'static str)>,
}

impl WorkerEnv {
    /// [`WorkerEnv::from_vars`] over the process environment.
    pub fn from_env() -> Result<WorkerEnv> {
        WorkerEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// Resolves the environment `get` gives, in the precedence of the module docs. Errors name
    /// the variable and its value.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<WorkerEnv> {
        let vars = Vars(get);
        let Ranks {
            rank,
            world_size,
            local_rank,
            local_world_size,
            source,
            read_from,
        } = ranks(&vars)?;
        let origin = format!("from {source}{}", read_list(&read_from));
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is not in a world of size {world_size} ({origin})");
        }
        if local_world_size == 0 || local_rank >= local_world_size || local_world_size > world_size
        {
            bail!(
                "local_rank {local_rank} / local_world_size {local_world_size} do not fit a world of {world_size} ({origin})"
            );
        }
        let slurm_job = vars.get("SLURM_JOB_ID");
        let (master_addr, master_port) = match (vars.get("MASTER_ADDR"), vars.num("MASTER_PORT")?) {
            (Some(addr), Some(port)) => (addr, port_of(port)?),
            (addr, port) => {
                let list = [
                    "SLURM_STEP_NODELIST",
                    "SLURM_JOB_NODELIST",
                    "SLURM_NODELIST",
                ]
                .into_iter()
                .find_map(|k| vars.get(k).map(|v| (k, v)));
                let slurm_addr = match list {
                    Some((key, list)) => crate::hostlist::expand(&list)
                        .with_context(|| format!("{key} is not a valid SLURM hostlist"))?
                        .into_iter()
                        .next(),
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
        let master_port = if vars
            .get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v == "True")
        {
            master_port.checked_add(1).context(
                "MASTER_PORT is 65535: no port after it for devise's store under torchrun",
            )?
        } else {
            master_port
        };
        let run_id = vars
            .get("DEVISE_RUN_ID")
            .or_else(|| vars.get("TORCHELASTIC_RUN_ID"))
            .or(slurm_job)
            .unwrap_or_else(|| "local".into());
        let token = vars
            .get("DEVISE_RDZV_TOKEN")
            .unwrap_or_else(|| format!("run-id:{run_id}"));
        let restart_attempt = match vars
            .get("DEVISE_RESTART_ATTEMPT")
            .map(|v| ("DEVISE_RESTART_ATTEMPT", v))
            .or_else(|| {
                vars.get("TORCHELASTIC_RESTART_COUNT")
                    .map(|v| ("TORCHELASTIC_RESTART_COUNT", v))
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
            read_from,
        })
    }
}

/// The rank values, in the precedence of the module docs (not yet checked for consistency).
fn ranks<F: Fn(&str) -> Option<String>>(v: &Vars<F>) -> Result<Ranks> {
    match (v.num("RANK")?, v.num("WORLD_SIZE")?) {
        (Some(rank), Some(world_size)) => {
            let mut read_from = vec![("rank", "RANK"), ("world_size", "WORLD_SIZE")];
            let local_rank = v.num("LOCAL_RANK")?;
            let local_world_size = v.num("LOCAL_WORLD_SIZE")?;
            read_from.push((
                "local_rank",
                if local_rank.is_some() {
                    "LOCAL_RANK"
                } else {
                    "default 0 (LOCAL_RANK unset)"
                },
            ));
            read_from.push((
                "local_world_size",
                if local_world_size.is_some() {
                    "LOCAL_WORLD_SIZE"
                } else {
                    "default 1 (LOCAL_WORLD_SIZE unset)"
                },
            ));
            return Ok(Ranks {
                rank,
                world_size,
                local_rank: local_rank.unwrap_or(0),
                local_world_size: local_world_size.unwrap_or(1),
                source: EnvSource::Torchrun,
                read_from,
            });
        }
        (Some(_), None) => bail!("RANK is set but WORLD_SIZE is not"),
        (None, Some(_)) => bail!("WORLD_SIZE is set but RANK is not"),
        (None, None) => {}
    }
    if let Some(rank) = v.num("SLURM_PROCID")? {
        return slurm_task(v, rank);
    }
    refuse_partial_world(v)?;
    Ok(Ranks {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        local_world_size: 1,
        source: EnvSource::Single,
        read_from: Vec::new(),
    })
}

/// Case 2 of the module docs: a process with `SLURM_PROCID`.
fn slurm_task<F: Fn(&str) -> Option<String>>(v: &Vars<F>, rank: usize) -> Result<Ranks> {
    let step_marker = ["SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS"]
        .into_iter()
        .find(|k| v.get(k).is_some());
    if step_marker.is_none() && rank == 0 {
        // sbatch runs the batch script as task 0 of the job's batch step, without step
        // variables: one process, unless the job asked for several tasks.
        return match v.num("SLURM_NTASKS")? {
            None | Some(1) => Ok(Ranks {
                rank: 0,
                world_size: 1,
                local_rank: 0,
                local_world_size: 1,
                source: EnvSource::SlurmBatch,
                read_from: vec![("rank", "SLURM_PROCID")],
            }),
            Some(n) => bail!(
                "SLURM_PROCID=0 and SLURM_NTASKS={n}, but none of the step variables srun sets \
                 (SLURM_STEP_ID, SLURM_STEP_NUM_TASKS): this is the batch script of a {n}-task \
                 job, not one of its tasks. Start the tasks with srun (`srun devise train ...`, \
                 one task per GPU) or one launcher per node (`srun --ntasks-per-node=1 \
                 devise-launch -- devise train ...`); if a container dropped the step \
                 variables, pass SLURM_STEP_* through"
            ),
        };
    }
    let mut read_from = vec![("rank", "SLURM_PROCID")];
    let (world_size, world_key) = match v.num("SLURM_STEP_NUM_TASKS")? {
        Some(n) => (n, "SLURM_STEP_NUM_TASKS"),
        None => match v.num("SLURM_NTASKS")? {
            Some(n) => (n, "SLURM_NTASKS"),
            None => {
                let step = step_marker.map_or(String::new(), |k| format!(" ({k} is set)"));
                bail!(
                    "SLURM_PROCID={rank} is set{step} but neither SLURM_STEP_NUM_TASKS nor \
                     SLURM_NTASKS is: cannot tell the world size"
                )
            }
        },
    };
    read_from.push(("world_size", world_key));
    if rank >= world_size {
        bail!("rank {rank} (SLURM_PROCID) is not in a world of size {world_size} ({world_key})");
    }
    let (local_world_size, local_key) = slurm_local_world_size(v, world_size, world_key)?;
    read_from.push(("local_world_size", local_key));
    let local_rank = match v.num("SLURM_LOCALID")? {
        Some(l) => {
            read_from.push(("local_rank", "SLURM_LOCALID"));
            l
        }
        None if local_world_size == 1 => 0,
        None => bail!(
            "SLURM_LOCALID is not set, but {local_world_size} tasks run on this node (from \
             {local_key}): cannot tell which of them this is (which GPU is its own)"
        ),
    };
    Ok(Ranks {
        rank,
        world_size,
        local_rank,
        local_world_size,
        source: EnvSource::Slurm,
        read_from,
    })
}

/// How many of the step's `world_size` tasks run on this node, and the variable that said so
/// (the fallbacks of the module docs).
fn slurm_local_world_size<F: Fn(&str) -> Option<String>>(
    v: &Vars<F>,
    world_size: usize,
    world_key: &str,
) -> Result<(usize, &'static str)> {
    let node = v.num("SLURM_NODEID")?;
    if let Some(list) = v.get("SLURM_STEP_TASKS_PER_NODE") {
        let n = node_entry("SLURM_STEP_TASKS_PER_NODE", &list, node)?;
        return Ok((n, "SLURM_STEP_TASKS_PER_NODE"));
    }
    if let Some(gtids) = v.get("SLURM_GTIDS") {
        let ids: Vec<&str> = gtids.split(',').collect();
        if ids
            .iter()
            .any(|id| id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()))
        {
            bail!("SLURM_GTIDS={gtids:?} is not a comma-separated list of task ids (e.g. 4,5,6,7)");
        }
        return Ok((ids.len(), "SLURM_GTIDS"));
    }
    if let Some(list) = v.get("SLURM_TASKS_PER_NODE") {
        let n = node_entry("SLURM_TASKS_PER_NODE", &list, node)?;
        return Ok((n, "SLURM_TASKS_PER_NODE"));
    }
    let nodes = v.num("SLURM_STEP_NUM_NODES")?;
    let per_node = v.num("SLURM_NTASKS_PER_NODE")?;
    // The job's --ntasks-per-node: still set in a step started with fewer tasks, so trusted
    // only when it accounts for the step's tasks.
    if let (Some(n), Some(nodes)) = (per_node, nodes) {
        if n.checked_mul(nodes) == Some(world_size) {
            return Ok((n, "SLURM_NTASKS_PER_NODE"));
        }
    }
    match nodes {
        Some(1) => return Ok((world_size, "SLURM_STEP_NUM_NODES (one node: every task)")),
        Some(n) if n == world_size => {
            return Ok((1, "SLURM_STEP_NUM_NODES (as many nodes as tasks: one each)"))
        }
        _ => {}
    }
    let per_node_text = match per_node {
        Some(n) => format!(
            " is set, SLURM_NTASKS_PER_NODE={n} (the job's) does not account for the step's \
             {world_size} tasks"
        ),
        None => ", SLURM_NTASKS_PER_NODE is set".to_string(),
    };
    let spread = match nodes {
        Some(n) => format!(
            ", and {world_size} tasks on {n} nodes (SLURM_STEP_NUM_NODES) do not fix the count \
             per node"
        ),
        None => ", nor is SLURM_STEP_NUM_NODES".to_string(),
    };
    bail!(
        "cannot tell how many of the step's {world_size} tasks ({world_key}) run on this node: none of \
         SLURM_STEP_TASKS_PER_NODE, SLURM_GTIDS, SLURM_TASKS_PER_NODE{per_node_text}{spread}. \
         srun sets them for every task: pass them through (a container's environment list?)"
    )
}

/// This node's entry of a per-node task count list (`SLURM_STEP_TASKS_PER_NODE` /
/// `SLURM_TASKS_PER_NODE`). A list with one count for every node needs no node id.
fn node_entry(key: &str, list: &str, node: Option<usize>) -> Result<usize> {
    let groups = parse_tasks_per_node(list).with_context(|| {
        format!("{key}={list:?} is not a SLURM task count list (e.g. 8, 4(x2), 2(x3),1)")
    })?;
    let first = groups.first().map(|&(count, _)| count);
    if groups.iter().all(|&(count, _)| Some(count) == first) {
        if let Some(count) = first {
            return Ok(count);
        }
    }
    let node = node.with_context(|| {
        format!("{key}={list:?} differs between nodes, but SLURM_NODEID is not set")
    })?;
    tasks_on_node(&groups, node)
        .with_context(|| format!("{key}={list:?} has no entry for SLURM_NODEID {node}"))
}

/// `8(x2),4` as `[(8, 2), (4, 1)]`: counts and repeats, each at least 1. `None` when malformed.
fn parse_tasks_per_node(v: &str) -> Option<Vec<(usize, usize)>> {
    let positive = |s: &str| -> Option<usize> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().filter(|&n| n > 0)
    };
    v.split(',')
        .map(|part| match part.split_once("(x") {
            Some((count, rest)) => Some((positive(count)?, positive(rest.strip_suffix(')')?)?)),
            None => Some((positive(part)?, 1)),
        })
        .collect()
}

/// Node `node`'s count in parsed groups: `[(8, 2), (4, 1)]` is 8, 8, 4.
fn tasks_on_node(groups: &[(usize, usize)], node: usize) -> Option<usize> {
    let mut seen: usize = 0;
    for &(count, repeat) in groups {
        seen = seen.saturating_add(repeat);
        if node < seen {
            return Some(count);
        }
    }
    None
}

/// Case 3 of the module docs: no rank variables, but signs that this process is one of
/// several. Errors name the variable.
fn refuse_partial_world<F: Fn(&str) -> Option<String>>(v: &Vars<F>) -> Result<()> {
    for k in ["LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"] {
        if let Some(val) = v.get(k) {
            bail!(
                "{k}={val:?} is set but RANK and WORLD_SIZE are not: this process was started \
                 as one of several workers without its rank; refusing to run as rank 0 of 1 \
                 (set RANK and WORLD_SIZE, or unset {k})"
            );
        }
    }
    if let Some(local) = v.get("SLURM_LOCALID") {
        bail!(
            "SLURM_LOCALID={local:?} is set but SLURM_PROCID is not: srun started this task but \
             its rank is missing (a container dropping variables?); refusing to run as rank 0 \
             of 1 (pass SLURM_PROCID and the SLURM_STEP_* variables through)"
        );
    }
    for k in ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"] {
        if let Some(n) = v.num(k)?.filter(|&n| n > 1) {
            bail!(
                "{k}={n}: this SLURM job runs {n} tasks, but this process has no rank (neither \
                 RANK nor SLURM_PROCID is set): start the tasks with srun (`srun devise train \
                 ...`, one task per GPU) or devise-launch; set RANK=0 WORLD_SIZE=1 to run one \
                 process anyway"
            );
        }
    }
    Ok(())
}

/// GPUs a `CUDA_VISIBLE_DEVICES` value exposes: its comma-separated entries (indices or
/// `GPU-`/`MIG-` UUIDs) up to the first empty or `-1` one (CUDA ignores the rest); SLURM's
/// `NoDevFiles` and an empty value expose none.
pub fn visible_gpu_count(v: &str) -> usize {
    if v.trim() == "NoDevFiles" {
        return 0;
    }
    v.split(',')
        .map(str::trim)
        .take_while(|e| !e.is_empty() && *e != "-1")
        .count()
}

/// The CUDA device ordinal of local worker `local_rank` of `local_world_size`: its position in
/// the list of GPUs it sees, never a physical id. `cuda_visible_devices` is the process's
/// `CUDA_VISIBLE_DEVICES` (`None`: unset, every GPU of the node visible), `device_count` the
/// number of GPUs CUDA enumerates (libtorch's `device_count`; it already honours the
/// variable).
///
/// - Exactly one GPU visible (`srun --gpus-per-task=1`, `--ntasks-per-gpu=N`): ordinal 0,
///   whatever the local rank.
/// - Several: ordinal `local_rank` (every task of the node sees the node's GPUs in the same
///   order), which needs `local_world_size <= visible`.
///
/// Errors (before any work): no GPU visible; more local ranks than visible GPUs. Both name the
/// counts and `CUDA_VISIBLE_DEVICES`.
pub fn cuda_ordinal(
    local_rank: usize,
    local_world_size: usize,
    cuda_visible_devices: Option<&str>,
    device_count: usize,
) -> Result<usize> {
    let visible = match cuda_visible_devices {
        Some(v) => visible_gpu_count(v).min(device_count),
        None => device_count,
    };
    let shown = match cuda_visible_devices {
        Some(v) => format!("CUDA_VISIBLE_DEVICES={v:?}"),
        None => "CUDA_VISIBLE_DEVICES unset".to_string(),
    };
    match visible {
        0 => bail!("no CUDA device is visible to this process ({shown}, CUDA sees {device_count})"),
        1 => Ok(0),
        n if local_world_size > n => bail!(
            "{local_world_size} workers run on this node (local_world_size) but this one sees \
             only {n} GPUs ({shown}): local_rank {local_rank} has no GPU of its own. Give each \
             worker one GPU (srun --gpus-per-task=1 or --ntasks-per-gpu=1), or start at most {n} \
             per node"
        ),
        _ => Ok(local_rank),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<WorkerEnv> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorkerEnv::from_vars(|k| map.get(k).cloned())
    }

    /// `K=V K=V ...` (as `env | grep SLURM_ | tr '\n' ' '` prints a task's variables) as a map.
    fn parse_env(line: &str) -> HashMap<String, String> {
        line.split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("K=V");
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    /// What a case expects: the task's place and CUDA ordinal, or an error.
    enum Want {
        /// `(rank, local_rank, world_size, local_world_size)` and the ordinal (or the ordinal
        /// error's text).
        Task(usize, usize, usize, usize, Result<usize, &'static str>),
        /// The error [`WorkerEnv::from_vars`] gives contains this.
        Refused(&'static str),
    }
    use Want::{Refused, Task};

    /// One situation: the variables a task of that SLURM command has.
    struct Case {
        name: &'static str,
        /// How the task was started. `real:` cases are the variables real srun/sbatch/salloc
        /// (SLURM 22.05, `select/cons_tres`, four GPUs in `gres.conf`, one node) gave the
        /// task, printed with `env | grep`. `built:` cases are multi-node steps or damaged
        /// environments, written from srun's documented output variables and the real ones.
        how: &'static str,
        env: &'static str,
        /// GPUs CUDA enumerates in the task (libtorch's `device_count`).
        cuda_devices: usize,
        want: Want,
    }

    /// The SLURM situations of a worker started without devise-launch.
    const CASES: &[Case] = &[
        Case {
            name: "one GPU per task: task 3 sees only its own GPU, as cuda:0",
            how: "real: srun -n4 --gpus-per-task=1",
            env: "CUDA_VISIBLE_DEVICES=3 GPU_DEVICE_ORDINAL=3 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=0,1,2,3 SLURM_JOB_ID=4 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=3 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_PROCID=3 SLURM_STEPID=0 SLURM_STEP_GPUS=3 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 1,
            want: Task(3, 3, 4, 4, Ok(0)),
        },
        Case {
            name: "one task per GPU: task 2 as cuda:0",
            how: "real: srun -n4 --ntasks-per-gpu=1",
            env: "CUDA_VISIBLE_DEVICES=2 GPU_DEVICE_ORDINAL=2 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=0,1,2,3 SLURM_JOB_ID=7 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=2 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_PROCID=2 SLURM_STEPID=0 SLURM_STEP_GPUS=2 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 1,
            want: Task(2, 2, 4, 4, Ok(0)),
        },
        Case {
            name: "two tasks per GPU: task 1 shares GPU 0 with task 0, as cuda:0",
            how: "real: srun -n4 --ntasks-per-gpu=2",
            env: "CUDA_VISIBLE_DEVICES=0 GPU_DEVICE_ORDINAL=0 SLURM_GPUS_ON_NODE=2 SLURM_GTIDS=0,1,2,3 SLURM_JOB_ID=8 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=1 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_PROCID=1 SLURM_STEPID=0 SLURM_STEP_GPUS=0 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 1,
            want: Task(1, 1, 4, 4, Ok(0)),
        },
        Case {
            name: "every task sees the node's four GPUs: task 2 takes the third",
            how: "real: srun -n4 --gres=gpu:4",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 GPU_DEVICE_ORDINAL=0,1,2,3 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=0,1,2,3 SLURM_JOB_ID=5 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=2 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_PROCID=2 SLURM_STEPID=0 SLURM_STEP_GPUS=0,1,2,3 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 4,
            want: Task(2, 2, 4, 4, Ok(2)),
        },
        Case {
            name: "four tasks share two GPUs: an error before any work",
            how: "real: srun -n4 --gres=gpu:2",
            env: "CUDA_VISIBLE_DEVICES=0,1 GPU_DEVICE_ORDINAL=0,1 SLURM_GPUS_ON_NODE=2 SLURM_GTIDS=0,1,2,3 SLURM_JOB_ID=17 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=3 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_PROCID=3 SLURM_STEPID=0 SLURM_STEP_GPUS=0,1 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 2,
            want: Task(3, 3, 4, 4, Err("4 workers run on this node (local_world_size) but this one sees only 2 GPUs (CUDA_VISIBLE_DEVICES=\"0,1\")")),
        },
        Case {
            name: "GPUs not bound to tasks: no CUDA_VISIBLE_DEVICES, task 1 takes the second",
            how: "real: srun -n4 --gpus-per-task=1 --gpu-bind=none",
            env: "SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=0,1,2,3 SLURM_JOB_ID=19 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=1 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_PROCID=1 SLURM_STEPID=0 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 4,
            want: Task(1, 1, 4, 4, Ok(1)),
        },
        Case {
            name: "two GPUs per task: task 1 takes the second of its own two",
            how: "real: srun -n2 --gpus-per-task=2",
            env: "CUDA_VISIBLE_DEVICES=2,3 GPU_DEVICE_ORDINAL=2,3 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=0,1 SLURM_JOB_ID=20 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=1 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=2 SLURM_NTASKS=2 SLURM_PROCID=1 SLURM_STEPID=0 SLURM_STEP_GPUS=2,3 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_TASKS_PER_NODE=2 SLURM_TASKS_PER_NODE=2",
            cuda_devices: 2,
            want: Task(1, 1, 2, 2, Ok(1)),
        },
        Case {
            name: "a two-task step in a four-task allocation",
            how: "real: salloc -n4 --gres=gpu:4, then srun -n2",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 GPU_DEVICE_ORDINAL=0,1,2,3 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=0,1 SLURM_JOB_ID=9 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=1 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=2 SLURM_NTASKS=2 SLURM_PROCID=1 SLURM_STEPID=0 SLURM_STEP_GPUS=0,1,2,3 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_TASKS_PER_NODE=2 SLURM_TASKS_PER_NODE=2",
            cuda_devices: 4,
            want: Task(1, 1, 2, 2, Ok(1)),
        },
        Case {
            name: "the step's counts win over the job's left in the task's environment",
            how: "built: the two-task step above with the job's SLURM_NTASKS=4, SLURM_NPROCS=4, SLURM_TASKS_PER_NODE=4 (srun 22.05 overwrites them; a task environment that keeps the job's would wait for ranks 2 and 3)",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 GPU_DEVICE_ORDINAL=0,1,2,3 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=0,1 SLURM_JOB_ID=9 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=1 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_PROCID=1 SLURM_STEPID=0 SLURM_STEP_GPUS=0,1,2,3 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_TASKS_PER_NODE=2 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 4,
            want: Task(1, 1, 2, 2, Ok(1)),
        },
        Case {
            name: "a smaller step of a job with --ntasks-per-node=4: the job's SLURM_NTASKS_PER_NODE stays 4",
            how: "real: sbatch -n4 --ntasks-per-node=4 --gres=gpu:2, the script runs srun -n2",
            env: "CUDA_VISIBLE_DEVICES=0,1 GPU_DEVICE_ORDINAL=0,1 SLURM_GPUS_ON_NODE=2 SLURM_GTIDS=0,1 SLURM_JOB_GPUS=0,1 SLURM_JOB_ID=13 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=1 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=2 SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE=4 SLURM_PROCID=1 SLURM_STEPID=0 SLURM_STEP_GPUS=0,1 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_TASKS_PER_NODE=2 SLURM_TASKS_PER_NODE=2",
            cuda_devices: 2,
            want: Task(1, 1, 2, 2, Ok(1)),
        },
        Case {
            name: "the same with every per-node count but the stale SLURM_NTASKS_PER_NODE dropped",
            how: "built: the step above without SLURM_STEP_TASKS_PER_NODE, SLURM_GTIDS, SLURM_TASKS_PER_NODE",
            env: "CUDA_VISIBLE_DEVICES=0,1 SLURM_JOB_ID=13 SLURM_JOB_NODELIST=vm SLURM_LOCALID=1 SLURM_NODEID=0 SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE=4 SLURM_PROCID=1 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=2",
            cuda_devices: 2,
            want: Task(1, 1, 2, 2, Ok(1)),
        },
        Case {
            name: "a one-task step in a four-task allocation",
            how: "real: salloc -n4 --gres=gpu:4, then srun -n1",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 GPU_DEVICE_ORDINAL=0,1,2,3 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=0 SLURM_JOB_ID=18 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=0 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=1 SLURM_NTASKS=1 SLURM_PROCID=0 SLURM_STEPID=0 SLURM_STEP_GPUS=0,1,2,3 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=1 SLURM_STEP_TASKS_PER_NODE=1 SLURM_TASKS_PER_NODE=1",
            cuda_devices: 4,
            want: Task(0, 0, 1, 1, Ok(0)),
        },
        Case {
            name: "two nodes of four tasks: task 6 is local 2 on the second node",
            how: "built: srun -N2 --ntasks-per-node=4 --gpus-per-node=4",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 GPU_DEVICE_ORDINAL=0,1,2,3 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=4,5,6,7 SLURM_JOB_ID=31 SLURM_JOB_NODELIST=gpu[01-02] SLURM_JOB_NUM_NODES=2 SLURM_LOCALID=2 SLURM_NNODES=2 SLURM_NODEID=1 SLURM_NODELIST=gpu[01-02] SLURM_NPROCS=8 SLURM_NTASKS=8 SLURM_NTASKS_PER_NODE=4 SLURM_PROCID=6 SLURM_STEPID=0 SLURM_STEP_GPUS=0,1,2,3 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=gpu[01-02] SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=8 SLURM_STEP_TASKS_PER_NODE=4(x2) SLURM_TASKS_PER_NODE=4(x2)",
            cuda_devices: 4,
            want: Task(6, 2, 8, 4, Ok(2)),
        },
        Case {
            name: "seven tasks on two nodes (4 + 3): task 5 is local 1 of 3",
            how: "built: srun -N2 -n7 --gpus-per-node=4 (block distribution)",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 SLURM_GPUS_ON_NODE=4 SLURM_GTIDS=4,5,6 SLURM_JOB_ID=32 SLURM_JOB_NODELIST=gpu[01-02] SLURM_JOB_NUM_NODES=2 SLURM_LOCALID=1 SLURM_NNODES=2 SLURM_NODEID=1 SLURM_NODELIST=gpu[01-02] SLURM_NPROCS=7 SLURM_NTASKS=7 SLURM_PROCID=5 SLURM_STEPID=0 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=gpu[01-02] SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=7 SLURM_STEP_TASKS_PER_NODE=4,3 SLURM_TASKS_PER_NODE=4,3",
            cuda_devices: 4,
            want: Task(5, 1, 7, 3, Ok(1)),
        },
        Case {
            name: "seven tasks on four nodes (2(x3),1): task 6 is alone on the fourth",
            how: "built: srun -N4 -n7 --gpus-per-task=1",
            env: "CUDA_VISIBLE_DEVICES=0 SLURM_GPUS_ON_NODE=1 SLURM_GTIDS=6 SLURM_JOB_ID=33 SLURM_JOB_NODELIST=gpu[01-04] SLURM_JOB_NUM_NODES=4 SLURM_LOCALID=0 SLURM_NNODES=4 SLURM_NODEID=3 SLURM_NODELIST=gpu[01-04] SLURM_NPROCS=7 SLURM_NTASKS=7 SLURM_PROCID=6 SLURM_STEPID=0 SLURM_STEP_GPUS=0 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=gpu[01-04] SLURM_STEP_NUM_NODES=4 SLURM_STEP_NUM_TASKS=7 SLURM_STEP_TASKS_PER_NODE=2(x3),1 SLURM_TASKS_PER_NODE=2(x3),1",
            cuda_devices: 1,
            want: Task(6, 0, 7, 1, Ok(0)),
        },
        Case {
            name: "per-node counts dropped: SLURM_GTIDS gives the tasks on this node",
            how: "built: srun -N2 --ntasks-per-node=4, task 5, through an environment list that dropped SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 SLURM_GTIDS=4,5,6,7 SLURM_JOB_ID=31 SLURM_JOB_NODELIST=gpu[01-02] SLURM_LOCALID=1 SLURM_NODEID=1 SLURM_NTASKS=8 SLURM_PROCID=5 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=gpu[01-02] SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=8",
            cuda_devices: 4,
            want: Task(5, 1, 8, 4, Ok(1)),
        },
        Case {
            name: "per-node counts dropped: the job's SLURM_NTASKS_PER_NODE accounts for the step",
            how: "built: srun -N2 --ntasks-per-node=4, task 5, without SLURM_STEP_TASKS_PER_NODE, SLURM_GTIDS, SLURM_TASKS_PER_NODE",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 SLURM_JOB_ID=31 SLURM_JOB_NODELIST=gpu[01-02] SLURM_LOCALID=1 SLURM_NODEID=1 SLURM_NTASKS=8 SLURM_NTASKS_PER_NODE=4 SLURM_PROCID=5 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=gpu[01-02] SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=8",
            cuda_devices: 4,
            want: Task(5, 1, 8, 4, Ok(1)),
        },
        Case {
            name: "per-node counts dropped, one task per node: as many nodes as tasks",
            how: "built: srun -N8 --ntasks-per-node=1 --gpus-per-task=1, task 5, without SLURM_STEP_TASKS_PER_NODE, SLURM_GTIDS, SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE",
            env: "CUDA_VISIBLE_DEVICES=0 SLURM_JOB_ID=34 SLURM_JOB_NODELIST=gpu[01-08] SLURM_LOCALID=0 SLURM_NODEID=5 SLURM_NTASKS=8 SLURM_PROCID=5 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=gpu[01-08] SLURM_STEP_NUM_NODES=8 SLURM_STEP_NUM_TASKS=8",
            cuda_devices: 1,
            want: Task(5, 0, 8, 1, Ok(0)),
        },
        Case {
            name: "per-node counts dropped and nothing else fixes them: the error says so",
            how: "built: srun -N2 --ntasks-per-node=4, task 5, without SLURM_STEP_TASKS_PER_NODE, SLURM_GTIDS, SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 SLURM_JOB_ID=31 SLURM_JOB_NODELIST=gpu[01-02] SLURM_LOCALID=1 SLURM_NODEID=1 SLURM_NTASKS=8 SLURM_PROCID=5 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=gpu[01-02] SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=8",
            cuda_devices: 4,
            want: Refused("cannot tell how many of the step's 8 tasks (SLURM_STEP_NUM_TASKS) run on this node: none of SLURM_STEP_TASKS_PER_NODE, SLURM_GTIDS, SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE is set, and 8 tasks on 2 nodes (SLURM_STEP_NUM_NODES) do not fix the count per node"),
        },
        Case {
            name: "a task without SLURM_LOCALID among four on its node",
            how: "built: srun -n4 --gres=gpu:4, task 2, without SLURM_LOCALID",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 SLURM_GTIDS=0,1,2,3 SLURM_JOB_ID=5 SLURM_JOB_NODELIST=vm SLURM_NODEID=0 SLURM_NTASKS=4 SLURM_PROCID=2 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 4,
            want: Refused("SLURM_LOCALID is not set, but 4 tasks run on this node (from SLURM_STEP_TASKS_PER_NODE)"),
        },
        Case {
            name: "a task without SLURM_PROCID among four on its node: never rank 0 of 1",
            how: "built: srun -n4 --gres=gpu:4, task 2, without SLURM_PROCID",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 SLURM_GTIDS=0,1,2,3 SLURM_JOB_ID=5 SLURM_JOB_NODELIST=vm SLURM_LOCALID=2 SLURM_NODEID=0 SLURM_NTASKS=4 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=vm SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=4 SLURM_STEP_TASKS_PER_NODE=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 4,
            want: Refused("SLURM_LOCALID=\"2\" is set but SLURM_PROCID is not"),
        },
        Case {
            name: "the batch script of a four-task job, devise run without srun: never rank 0 of 4",
            how: "real: sbatch -n4 --ntasks-per-node=4 --gres=gpu:2 (the batch script's own variables)",
            env: "CUDA_VISIBLE_DEVICES=0,1 GPU_DEVICE_ORDINAL=0,1 SLURM_GPUS_ON_NODE=2 SLURM_GTIDS=0 SLURM_JOB_GPUS=0,1 SLURM_JOB_ID=13 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=0 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_NTASKS_PER_NODE=4 SLURM_PROCID=0 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 2,
            want: Refused("this is the batch script of a 4-task job, not one of its tasks"),
        },
        Case {
            name: "the batch script of a one-task job, devise run directly: one process",
            how: "real: sbatch --gres=gpu:1 (the batch script's own variables)",
            env: "CUDA_VISIBLE_DEVICES=0 GPU_DEVICE_ORDINAL=0 SLURM_GPUS_ON_NODE=1 SLURM_GTIDS=0 SLURM_JOB_GPUS=0 SLURM_JOB_ID=14 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_LOCALID=0 SLURM_NNODES=1 SLURM_NODEID=0 SLURM_NODELIST=vm SLURM_PROCID=0 SLURM_TASKS_PER_NODE=1",
            cuda_devices: 1,
            want: Task(0, 0, 1, 1, Ok(0)),
        },
        Case {
            name: "an salloc shell of a four-task job, devise typed at its prompt: never rank 0 of 1",
            how: "real: salloc -n4 (the shell's variables)",
            env: "SLURM_JOB_ID=12 SLURM_JOB_NODELIST=vm SLURM_JOB_NUM_NODES=1 SLURM_NNODES=1 SLURM_NODELIST=vm SLURM_NPROCS=4 SLURM_NTASKS=4 SLURM_TASKS_PER_NODE=4",
            cuda_devices: 0,
            want: Refused("SLURM_NTASKS=4: this SLURM job runs 4 tasks, but this process has no rank"),
        },
        Case {
            name: "devise-launch's worker: RANK/WORLD_SIZE win over the launcher's own srun variables",
            how: "built: srun -N2 --ntasks-per-node=1 --gpus-per-node=4 devise-launch, second node, local worker 1",
            env: "CUDA_VISIBLE_DEVICES=0,1,2,3 GROUP_RANK=1 LOCAL_RANK=1 LOCAL_WORLD_SIZE=4 MASTER_ADDR=gpu01 MASTER_PORT=10031 RANK=5 WORLD_SIZE=8 DEVISE_RUN_ID=31 SLURM_GTIDS=1 SLURM_JOB_ID=31 SLURM_JOB_NODELIST=gpu[01-02] SLURM_LOCALID=0 SLURM_NODEID=1 SLURM_NTASKS=2 SLURM_PROCID=1 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=gpu[01-02] SLURM_STEP_NUM_NODES=2 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_TASKS_PER_NODE=1(x2) SLURM_TASKS_PER_NODE=1(x2)",
            cuda_devices: 4,
            want: Task(5, 1, 8, 4, Ok(1)),
        },
        Case {
            name: "LOCAL_RANK without RANK/WORLD_SIZE: never rank 0 of 1",
            how: "built: a launcher that passed LOCAL_RANK only",
            env: "LOCAL_RANK=1 CUDA_VISIBLE_DEVICES=0,1",
            cuda_devices: 2,
            want: Refused("LOCAL_RANK=\"1\" is set but RANK and WORLD_SIZE are not"),
        },
    ];

    /// Every SLURM situation of the table resolves to its expected place and GPU, or to an
    /// error that names the real cause (never the old "do not fit" one for a missing count).
    #[test]
    fn slurm_worlds_without_the_launcher() {
        let mut failures = Vec::new();
        for case in CASES {
            let vars = parse_env(case.env);
            let got = WorkerEnv::from_vars(|k| vars.get(k).cloned());
            let cvd = vars.get("CUDA_VISIBLE_DEVICES").map(String::as_str);
            let verdict = match (&case.want, got) {
                (Task(rank, local_rank, world, local_world, ordinal), Ok(w)) => {
                    let place = (w.rank, w.local_rank, w.world_size, w.local_world_size);
                    let got_ordinal =
                        cuda_ordinal(w.local_rank, w.local_world_size, cvd, case.cuda_devices)
                            .map_err(|e| e.to_string());
                    let ordinal_ok = match (ordinal, &got_ordinal) {
                        (Ok(a), Ok(b)) => a == b,
                        (Err(text), Err(e)) => e.contains(text),
                        _ => false,
                    };
                    if place != (*rank, *local_rank, *world, *local_world) || !ordinal_ok {
                        Some(format!("got {place:?}, ordinal {got_ordinal:?} ({w})"))
                    } else if w.source == EnvSource::Slurm
                        && !w.to_string().contains("world_size from SLURM_")
                    {
                        Some(format!("the start-up line names no variable: {w}"))
                    } else {
                        None
                    }
                }
                (Task(..), Err(e)) => Some(format!("refused: {e:#}")),
                (Refused(text), Ok(w)) => Some(format!("accepted: {w} (expected {text:?})")),
                (Refused(text), Err(e)) => {
                    let e = format!("{e:#}");
                    (!e.contains(text) || e.contains("do not fit"))
                        .then(|| format!("error {e:?} does not contain {text:?}"))
                }
            };
            if let Some(why) = verdict {
                failures.push(format!("{} [{}]: {why}", case.name, case.how));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
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
            ("SLURM_STEP_NUM_TASKS", "16"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_NODEID", "1"),
            ("SLURM_LOCALID", "5"),
            ("SLURM_TASKS_PER_NODE", "8(x2)"),
            ("SLURM_STEP_TASKS_PER_NODE", "8(x2)"),
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
        assert_eq!(
            w.read_from,
            [
                ("rank", "SLURM_PROCID"),
                ("world_size", "SLURM_STEP_NUM_TASKS"),
                ("local_world_size", "SLURM_STEP_TASKS_PER_NODE"),
                ("local_rank", "SLURM_LOCALID"),
            ]
        );
        assert!(
            w.to_string().contains(
                "from SLURM task variables: rank from SLURM_PROCID, world_size from \
                 SLURM_STEP_NUM_TASKS, local_world_size from SLURM_STEP_TASKS_PER_NODE, \
                 local_rank from SLURM_LOCALID)"
            ),
            "{w}"
        );
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
            ("SLURM_STEP_NUM_TASKS", "12"),
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
        let groups = parse_tasks_per_node("8(x2),4").unwrap();
        assert_eq!(groups, [(8, 2), (4, 1)]);
        assert_eq!(tasks_on_node(&groups, 0), Some(8));
        assert_eq!(tasks_on_node(&groups, 1), Some(8));
        assert_eq!(tasks_on_node(&groups, 2), Some(4));
        assert_eq!(tasks_on_node(&groups, 3), None);
        for bad in [
            "x", "", "4,", "0", "4(x0)", "4(x2", "4x2)", "(x2)", "-1", "4(x-1)",
        ] {
            assert_eq!(parse_tasks_per_node(bad), None, "{bad:?}");
        }
        // Differing counts need the node id; a malformed list is an error naming it.
        let e = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "6"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "4,2"),
        ])
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("SLURM_NODEID is not set"),
            "{e:#}"
        );
        let e = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "6"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_NODEID", "7"),
            ("SLURM_STEP_TASKS_PER_NODE", "4,2"),
        ])
        .unwrap_err();
        assert!(
            format!("{e:#}")
                .contains("SLURM_STEP_TASKS_PER_NODE=\"4,2\" has no entry for SLURM_NODEID 7"),
            "{e:#}"
        );
        let e = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "6"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2"),
        ])
        .unwrap_err();
        assert!(
            format!("{e:#}")
                .contains("SLURM_STEP_TASKS_PER_NODE=\"4(x2\" is not a SLURM task count list"),
            "{e:#}"
        );
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
        // A one-task SLURM job without srun is one process too.
        let w = env(&[("SLURM_JOB_ID", "3"), ("SLURM_NTASKS", "1")]).unwrap();
        assert_eq!((w.rank, w.world_size, w.source), (0, 1, EnvSource::Single));
    }

    #[test]
    fn inconsistent_variables_are_errors_naming_them() {
        let e = env(&[("RANK", "2")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE"), "{e}");
        let e = env(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2") && e.contains("rank from RANK"), "{e}");
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "2"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[01"),
        ])
        .unwrap_err();
        assert!(format!("{e:#}").contains("SLURM_JOB_NODELIST"), "{e:#}");
        let e = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_GTIDS", "0,x"),
        ])
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("SLURM_STEP_NUM_TASKS nor SLURM_NTASKS"),
            "{e:#}"
        );
        let e = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_GTIDS", "0,x"),
        ])
        .unwrap_err();
        assert!(format!("{e:#}").contains("SLURM_GTIDS=\"0,x\""), "{e:#}");
    }

    #[test]
    fn the_ordinal_is_a_position_in_the_visible_list() {
        // Exactly one visible: cuda:0 whatever the local rank.
        assert_eq!(cuda_ordinal(7, 8, Some("7"), 1).unwrap(), 0);
        assert_eq!(cuda_ordinal(3, 4, Some("GPU-3f2a"), 1).unwrap(), 0);
        // Several: the local rank's position.
        assert_eq!(cuda_ordinal(2, 4, Some("4,5,6,7"), 4).unwrap(), 2);
        assert_eq!(cuda_ordinal(1, 2, None, 8).unwrap(), 1);
        // CUDA stops at -1 or an empty entry, and never shows more than it enumerates.
        assert_eq!(visible_gpu_count("0,1,-1,2"), 2);
        assert_eq!(visible_gpu_count("NoDevFiles"), 0);
        assert_eq!(visible_gpu_count(""), 0);
        assert_eq!(visible_gpu_count("GPU-0a1b,MIG-2c3d"), 2);
        assert_eq!(cuda_ordinal(1, 4, Some("0,1,2,3"), 1).unwrap(), 0);
        // Errors name the counts and the variable.
        let e = cuda_ordinal(2, 4, Some("0,1"), 2).unwrap_err().to_string();
        assert!(
            e.contains("4 workers run on this node")
                && e.contains("only 2 GPUs")
                && e.contains("CUDA_VISIBLE_DEVICES=\"0,1\""),
            "{e}"
        );
        let e = cuda_ordinal(0, 1, Some("NoDevFiles"), 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no CUDA device") && e.contains("NoDevFiles"),
            "{e}"
        );
        let e = cuda_ordinal(0, 1, None, 0).unwrap_err().to_string();
        assert!(e.contains("CUDA_VISIBLE_DEVICES unset"), "{e}");
    }

    /// The variables `from_vars` and `cuda_ordinal` read.
    const VARS: &[&str] = &[
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_LOCALID",
        "SLURM_NODEID",
        "SLURM_STEP_TASKS_PER_NODE",
        "SLURM_GTIDS",
        "SLURM_TASKS_PER_NODE",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_STEP_NUM_NODES",
        "SLURM_STEP_ID",
        "SLURM_STEPID",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
        "SLURM_JOB_ID",
        "DEVISE_RUN_ID",
        "TORCHELASTIC_RUN_ID",
        "DEVISE_RDZV_TOKEN",
        "DEVISE_RESTART_ATTEMPT",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_USE_AGENT_STORE",
        "CUDA_VISIBLE_DEVICES",
    ];

    /// Environments that resolve: the table's, plus nothing at all.
    fn good_bases() -> Vec<HashMap<String, String>> {
        let mut bases: Vec<_> = CASES
            .iter()
            .filter(|c| matches!(c.want, Task(_, _, _, _, Ok(_))))
            .map(|c| parse_env(c.env))
            .collect();
        bases.push(HashMap::new());
        bases
    }

    /// Resolves `vars` and picks the GPU as a worker does (`devise train` names the world in
    /// a GPU error); the error text, if any.
    fn resolve_all(vars: &HashMap<String, String>, cuda_devices: usize) -> Result<(), String> {
        let w = WorkerEnv::from_vars(|k| vars.get(k).cloned()).map_err(|e| format!("{e:#}"))?;
        let cvd = vars.get("CUDA_VISIBLE_DEVICES").map(String::as_str);
        cuda_ordinal(w.local_rank, w.local_world_size, cvd, cuda_devices)
            .map(|_| ())
            .with_context(|| format!("choosing the GPU of {w}"))
            .map_err(|e| format!("{e:#}"))
    }

    proptest! {
        /// One variable of a working environment set to arbitrary Unicode: no panic, and a
        /// refusal names that variable.
        #[test]
        fn one_arbitrary_variable_is_refused_by_name(
            base in 0usize..64,
            var in proptest::sample::select(VARS),
            value in prop_oneof![any::<String>(), "[0-9x(),-]{0,8}", "\\PC{0,12}"],
        ) {
            let bases = good_bases();
            let mut vars = bases[base % bases.len()].clone();
            let devices = vars
                .get("CUDA_VISIBLE_DEVICES")
                .map_or(8, |v| visible_gpu_count(v));
            prop_assume!(resolve_all(&vars, devices).is_ok());
            vars.insert(var.to_string(), value.clone());
            if let Err(e) = resolve_all(&vars, devices) {
                prop_assert!(e.contains(var), "{var}={value:?}: {e}");
            }
        }

        /// Any mix of the variables with arbitrary values: no panic.
        #[test]
        fn arbitrary_environments_never_panic(
            pairs in proptest::collection::vec(
                (proptest::sample::select(VARS), prop_oneof![any::<String>(), "[0-9]{1,3}", "[0-9(x),]{0,10}"]),
                0..12,
            ),
            devices in 0usize..9,
        ) {
            let vars: HashMap<String, String> =
                pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let _ = resolve_all(&vars, devices);
        }
    }
}
