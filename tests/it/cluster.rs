//! Scope: the cluster recipes as files: every SLURM script passes `bash -n` and shellcheck, and
//! the Kubernetes manifest is consistent with itself and with `devise-launch` (node count, node
//! rank from the Job index, rendezvous address through the headless Service, GPUs per pod,
//! `--resume auto`, credentials from a Secret). `slurm.rs` runs both SLURM scripts under a real
//! one-node SLURM; `resume.rs` runs `slurm/train.sbatch` as two nodes under a stand-in `srun`.
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

fn cluster() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster")
}

/// `bash -n SCRIPT` succeeds.
fn bash_n(script: &Path) {
    let out = Command::new("bash").arg("-n").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "bash -n {}: {out:?}",
        script.display()
    );
}

/// shellcheck passes on all of `scripts`; without shellcheck a printed skip, except under CI.
fn shellcheck(scripts: &[PathBuf]) {
    match Command::new("shellcheck").args(scripts).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI=true but shellcheck is missing (scripts/test.sh installs it)"
            );
            eprintln!("SKIP: shellcheck not installed: only bash -n ran");
        }
    }
}

#[test]
fn slurm_scripts_pass_bash_n_and_shellcheck() {
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(cluster().join("slurm"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sbatch"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 2, "{scripts:?}");
    for script in &scripts {
        bash_n(script);
        let text = std::fs::read_to_string(script).unwrap();
        for needed in [
            "--signal=B:USR1@90",
            "--requeue",
            "scontrol requeue",
            "--resume auto",
        ] {
            assert!(text.contains(needed), "{}: no {needed}", script.display());
        }
    }
    shellcheck(&scripts);
}

/// Every other shell script of the project (scripts/, bench/, .ci/run) passes shellcheck too.
#[test]
fn every_project_shell_script_passes_shellcheck() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut scripts = vec![root.join(".ci/run")];
    for dir in ["scripts", "bench"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "sh") {
                scripts.push(path);
            }
        }
    }
    scripts.sort();
    assert!(
        scripts
            .iter()
            .any(|p| p.ends_with("scripts/imagenet-21k-eval-split.sh")),
        "{scripts:?}"
    );
    for script in &scripts {
        bash_n(script);
    }
    shellcheck(&scripts);
}

fn arg_after<'a>(args: &'a [&'a str], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1]
}

#[test]
fn the_kubernetes_job_and_service_agree_with_each_other_and_the_launcher() {
    let text = std::fs::read_to_string(cluster().join("k8s/devise-job.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let kind = |d: &Yaml| d["kind"].as_str().unwrap_or_default().to_string();
    let service = docs
        .iter()
        .find(|d| kind(d) == "Service")
        .expect("a Service");
    let job = docs.iter().find(|d| kind(d) == "Job").expect("a Job");

    let job_name = job["metadata"]["name"].as_str().unwrap();
    let service_name = service["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        service["spec"]["clusterIP"].as_str(),
        Some("None"),
        "headless"
    );
    assert_eq!(
        service["spec"]["selector"]["job-name"].as_str(),
        Some(job_name)
    );
    let port = service["spec"]["ports"][0]["port"].as_i64().unwrap();

    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let nodes = spec["completions"].as_i64().unwrap();
    assert_eq!(
        spec["parallelism"].as_i64(),
        Some(nodes),
        "all pods at once"
    );
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["subdomain"].as_str(), Some(service_name));
    assert_eq!(pod["restartPolicy"].as_str(), Some("OnFailure"));
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 120);
    let container = &pod["containers"][0];
    let script = container["args"][0].as_str().unwrap();
    let args: Vec<&str> = script.split_whitespace().collect();
    assert_eq!(args[..2], ["exec", "devise-launch"]);
    assert_eq!(arg_after(&args, "--nnodes"), nodes.to_string());
    assert_eq!(arg_after(&args, "--node-rank"), "\"$JOB_COMPLETION_INDEX\"");
    assert_eq!(
        arg_after(&args, "--master-addr"),
        format!("{job_name}-0.{service_name}"),
        "pod 0 of an Indexed Job is <job>-0, reachable through the Service as <job>-0.<service>"
    );
    assert_eq!(arg_after(&args, "--master-port"), port.to_string());
    let gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        .as_i64()
        .unwrap();
    assert_eq!(arg_after(&args, "--nproc-per-node"), gpus.to_string());
    assert!(arg_after(&args, "--max-restarts").parse::<u32>().unwrap() >= 1);
    assert_eq!(arg_after(&args, "--resume"), "auto");
    assert_eq!(arg_after(&args, "--"), "devise");
    let config = arg_after(&args, "--config");
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(config).is_file(),
        "{config} is a shipped config"
    );
    assert_eq!(
        container["ports"][0]["containerPort"].as_i64(),
        Some(port),
        "the rendezvous port"
    );
    assert!(
        container["envFrom"][0]["secretRef"]["name"]
            .as_str()
            .is_some(),
        "object-store credentials from a Secret"
    );
}
