//! The pipeline as a petgraph DAG: topological order, cycles, and DOT / Mermaid renderings.

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::error::ConfigError;
use crate::pipeline::Pipeline;

/// Edges point from a stage to the stages that read its outputs.
pub fn build(pipeline: &Pipeline) -> DiGraph<usize, ()> {
    let mut graph = DiGraph::with_capacity(pipeline.stages.len(), pipeline.stages.len());
    let nodes: Vec<NodeIndex> = (0..pipeline.stages.len())
        .map(|i| graph.add_node(i))
        .collect();
    for (i, &node) in nodes.iter().enumerate() {
        for dep in pipeline.dependencies(i) {
            graph.add_edge(nodes[dep], node, ());
        }
    }
    graph
}

/// Stage indices in an order where every stage comes after what it reads.
pub fn topological_order(pipeline: &Pipeline) -> Vec<usize> {
    let graph = build(pipeline);
    match toposort(&graph, None) {
        Ok(order) => order.into_iter().map(|n| graph[n]).collect(),
        // Loading rejects cycles, so this is unreachable for a loaded pipeline.
        Err(_) => (0..pipeline.stages.len()).collect(),
    }
}

/// A cycle, printed as `a -> b -> a`, with the location of its first stage.
pub(crate) fn find_cycle(pipeline: &Pipeline) -> Result<(), ConfigError> {
    let graph = build(pipeline);
    if toposort(&graph, None).is_ok() {
        return Ok(());
    }
    let scc = tarjan_scc(&graph)
        .into_iter()
        .find(|c| c.len() > 1 || graph.contains_edge(c[0], c[0]))
        .unwrap_or_default();
    let Some(&start) = scc.iter().min_by_key(|n| graph[**n]) else {
        return Ok(());
    };
    // Walk edges inside the component until we are back at the start.
    let mut path = vec![start];
    let mut seen = std::collections::HashSet::from([start]);
    let mut current = start;
    loop {
        let mut next_nodes: Vec<NodeIndex> = graph
            .neighbors(current)
            .filter(|n| scc.contains(n))
            .collect();
        next_nodes.sort_by_key(|n| graph[*n]);
        let next = next_nodes
            .iter()
            .copied()
            .find(|n| *n == start)
            .or_else(|| next_nodes.iter().copied().find(|n| !seen.contains(n)));
        let Some(next) = next else { break };
        path.push(next);
        if next == start {
            break;
        }
        seen.insert(next);
        current = next;
    }
    let names: Vec<&str> = path
        .iter()
        .map(|n| pipeline.stages[graph[*n]].id.as_str())
        .collect();
    let first = &pipeline.stages[graph[start]];
    Err(ConfigError::new(format!("the stages form a cycle: {}", names.join(" -> ")), Some(first.location.clone()))
        .hint("a stage cannot read, directly or through others, its own output; remove one of these inputs"))
}

/// Graphviz DOT.
pub fn to_dot(pipeline: &Pipeline) -> String {
    let mut out = format!(
        "digraph {:?} {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n",
        pipeline.name
    );
    for stage in &pipeline.stages {
        out.push_str(&format!(
            "  {:?} [label={:?}];\n",
            stage.id,
            format!("{}\n({})", stage.id, stage.kind)
        ));
    }
    for (i, stage) in pipeline.stages.iter().enumerate() {
        for dep in pipeline.dependencies(i) {
            out.push_str(&format!(
                "  {:?} -> {:?};\n",
                pipeline.stages[dep].id, stage.id
            ));
        }
    }
    out.push_str("}\n");
    out
}

/// Mermaid flowchart.
pub fn to_mermaid(pipeline: &Pipeline) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, stage) in pipeline.stages.iter().enumerate() {
        out.push_str(&format!(
            "  s{i}[\"{}<br/><small>{}</small>\"]\n",
            stage.id.replace('"', "'"),
            stage.kind
        ));
    }
    for i in 0..pipeline.stages.len() {
        for dep in pipeline.dependencies(i) {
            out.push_str(&format!("  s{dep} --> s{i}\n"));
        }
    }
    out
}
