//! `cargo xtask cluster up|down|status`: a local cluster to experiment on.

use anyhow::bail;
use mesh_e2e::{
    Cluster, ClusterError, ClusterSpec, PodSpec,
    cluster::{self, Layout},
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build a cluster of network namespaces: nodes, pods, routes, cgroups.
    ///
    /// Example: cargo xtask cluster up --nodes 3 --pods-per-node 2
    Up {
        #[arg(long, default_value = "dev")]
        name: String,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
    },
    /// Tear a cluster down: its processes, namespaces, links and cgroups.
    ///
    /// Example: cargo xtask cluster down
    Down {
        #[arg(long, default_value = "dev")]
        name: String,
    },
    /// Show a cluster's nodes and pods with their addresses.
    ///
    /// Example: cargo xtask cluster status
    Status {
        #[arg(long, default_value = "dev")]
        name: String,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up {
            name,
            nodes,
            pods_per_node,
        } => {
            let pods = (0..nodes)
                .flat_map(|node| {
                    (0..pods_per_node)
                        .map(move |k| PodSpec::new("default", &format!("pod-{node}-{k}"), node))
                })
                .collect();
            let cluster = Cluster::up(&ClusterSpec {
                name: name.clone(),
                nodes,
                pods,
            })?;
            let layout = cluster.keep();
            println!("cluster {name} is up");
            print_layout(&layout, None);
            println!(
                "\nrun a command in a pod:  ip netns exec {} ip addr\ntear it down:            cargo xtask cluster down --name {name}",
                layout
                    .pods
                    .first()
                    .map_or("<pod-netns>", |p| p.netns.as_str())
            );
            Ok(())
        }
        Command::Down { name } => {
            let report = cluster::teardown(&name)?;
            if report.was_empty() {
                println!("no cluster {name} is up; nothing to remove");
            } else {
                println!("cluster {name} torn down: {report}");
            }
            Ok(())
        }
        Command::Status { name } => match cluster::status(&name) {
            Ok(status) => {
                println!("cluster {name} is up");
                print_layout(&status.layout, Some(&status.pod_processes));
                if !status.missing_namespaces.is_empty() {
                    bail!(
                        "cluster {name} is damaged: namespaces missing: {}; rebuild it with `cargo xtask cluster down --name {name}` then `up`",
                        status.missing_namespaces.join(", ")
                    );
                }
                Ok(())
            }
            Err(ClusterError::NotUp { .. }) => {
                println!(
                    "no cluster {name} is up (start one with `cargo xtask cluster up --name {name}`)"
                );
                Ok(())
            }
            Err(error) => Err(error.into()),
        },
    }
}

fn print_layout(layout: &Layout, processes: Option<&[usize]>) {
    println!(
        "\n{:<8} {:<22} {:<12} {:<14}",
        "NODE", "NETNS", "FABRIC IP", "POD GATEWAY"
    );
    for node in &layout.nodes {
        println!(
            "{:<8} {:<22} {:<12} {:<14}",
            node.name,
            node.netns,
            node.fabric_ip4.to_string(),
            node.gateway_ip4.to_string()
        );
    }
    println!(
        "\n{:<24} {:<6} {:<12} {:<16} PROCESSES",
        "POD", "NODE", "IPV4", "IPV6"
    );
    for (i, pod) in layout.pods.iter().enumerate() {
        let procs = processes.map_or("-".to_owned(), |p| p[i].to_string());
        println!(
            "{:<24} {:<6} {:<12} {:<16} {}",
            pod.id(),
            format!("node{}", pod.node),
            pod.ip4.to_string(),
            pod.ip6.to_string(),
            procs
        );
    }
}
