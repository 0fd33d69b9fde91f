"""The module graph: who consumes what, built from the modules' declarations (networkx).

Nodes are module labels (and ``source``); an edge ``a -> b`` means ``b`` reads a product that
``a`` produces. Checked before the first event: every consumed product has a producer, only
producers are consumed from, ``TriggerResults`` is read only on end paths, output modules sit
on end paths, and there is no cycle.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from .config import WorkflowConfig
from .event import make_tag, tag_label
from .module import Concurrency, Module, Producer
from .source import SOURCE_LABEL

TRIGGER_RESULTS = "TriggerResults"


@dataclass
class ModuleNode:
    label: str
    module: Module                  # the first instance; its parameters are those of every copy
    consumes: list[str]
    produces: list[str]
    deps: list[str] = field(default_factory=list)    # labels of the producers it reads from

    @property
    def kind(self) -> str:
        return self.module.kind


def _param_of(module: Module, tag: str) -> str | None:
    for name, param in module.parameters().items():
        if param.consumes and tag in param.tags(getattr(module, name)):
            return name
    return None


def unmerged_copies(label: str, cls) -> str | None:
    """A per-stream module that defines end_job and does not merge its copies: each copy's
    end_job sees only its own stream's events, which a newcomer does not expect."""
    if (Concurrency(cls.concurrency) is not Concurrency.STREAM or cls.end_job is Module.end_job
            or cls.merge_streams is not Module.merge_streams):
        return None
    return (f"module '{label}' ({cls.__name__}) has one copy per stream (concurrency "
            f"'stream') and an end_job, but no merge_streams: each copy sees only its own "
            f"stream's events. Define merge_streams(self, others) to fold the copies together, "
            f"or use concurrency = 'serial' (one instance that sees every event)")


class ModuleGraph:
    def __init__(self, config: WorkflowConfig, modules: dict[str, Module], source_tags: list[str]):
        self.config = config
        self.nodes: dict[str, ModuleNode] = {}
        producer_of: dict[str, str] = {tag: SOURCE_LABEL for tag in source_tags}
        for label, module in modules.items():
            produces = [make_tag(label, inst) for inst in module.produced_instances()]
            self.nodes[label] = ModuleNode(label, module, list(dict.fromkeys(
                module.consumed_tags())), produces)
            for tag in produces:
                producer_of[tag] = label
        self.producer_of = producer_of
        self.end_path_labels = {lab for labels in config.endpaths.values() for lab in labels}
        self.path_labels = {lab for labels in config.paths.values() for lab in labels}
        self.graph = nx.DiGraph()
        self.graph.add_node(SOURCE_LABEL)
        self.graph.add_nodes_from(self.nodes)
        self._link()
        self._check_cycles()

    def _link(self) -> None:
        cfg = self.config
        for node in self.nodes.values():
            for tag in node.consumes:
                param = _param_of(node.module, tag)
                if tag == TRIGGER_RESULTS:
                    if node.label not in self.end_path_labels or node.label in self.path_labels:
                        raise cfg.error("TriggerResults is only available to modules on end "
                                        "paths", node.label, param)
                    continue
                producer = self.producer_of.get(tag)
                target = self.nodes.get(tag_label(tag))
                if producer is None and target is not None and not isinstance(
                        target.module, Producer):
                    raise cfg.error(f"reads '{tag}' from '{target.label}', a {target.kind}; "
                                    f"only producers can be read from", node.label, param)
                if producer is None:
                    raise cfg.error(self._missing_message(tag), node.label, param)
                if producer != SOURCE_LABEL:
                    if not isinstance(self.nodes[producer].module, Producer):
                        raise cfg.error(f"reads '{tag}' from '{producer}', a "
                                        f"{self.nodes[producer].kind}; only producers can be "
                                        f"read from", node.label, param)
                    if producer not in node.deps:
                        node.deps.append(producer)
                if self.graph.has_edge(producer, node.label):
                    self.graph.edges[producer, node.label]["tags"].append(tag)
                else:
                    self.graph.add_edge(producer, node.label, tags=[tag])
            if node.kind == "output" and node.label not in self.end_path_labels:
                raise cfg.error("output modules run on end paths; add it to one", node.label)
            if node.label in self.end_path_labels and node.label in self.path_labels:
                raise cfg.error("a module is either on paths or on end paths, not both",
                                node.label)

    def _missing_message(self, tag: str) -> str:
        import difflib
        label = tag_label(tag)
        near = difflib.get_close_matches(tag, list(self.producer_of), n=3)
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        if label in self.nodes:
            return (f"consumes '{tag}' but module '{label}' produces only "
                    f"{self.nodes[label].produces or 'nothing'}{hint}")
        return f"consumes '{tag}', which no module and not the source produces{hint}"

    def _check_cycles(self) -> None:
        try:
            cycle = nx.find_cycle(self.graph)
        except nx.NetworkXNoCycle:
            return
        labels = [edge[0] for edge in cycle] + [cycle[0][0]]
        raise self.config.error("dependency cycle: " + " -> ".join(labels), labels[0])

    def warnings(self) -> list[str]:
        """Modules that would never run, and per-stream modules that would each see only
        their own stream's events in end_job."""
        consumed = {n for n in self.graph if self.graph.out_degree(n)}
        scheduled = self.path_labels | self.end_path_labels
        found = [f"module '{label}' is on no path and no module reads it: it never runs"
                 for label in self.nodes if label not in scheduled and label not in consumed]
        if self.config.process.streams > 1:
            found += [warning for node in self.nodes.values()
                      if (warning := unmerged_copies(node.label, type(node.module)))]
        return found

    def topological_labels(self) -> list[str]:
        return [n for n in nx.lexicographical_topological_sort(self.graph) if n != SOURCE_LABEL]

    def to_dot(self) -> str:
        shapes = {"producer": "box", "filter": "diamond", "analyzer": "ellipse",
                  "output": "folder"}
        lines = ["digraph recorun {", "  rankdir=LR;", '  node [fontname="Helvetica"];',
                 f'  "{SOURCE_LABEL}" [shape=cylinder];']
        for node in self.nodes.values():
            extra = ", style=bold" if hasattr(node.module, "acquire") else ""
            lines.append(f'  "{node.label}" [shape={shapes.get(node.kind, "box")}, '
                         f'label="{node.label}\\n{type(node.module).__name__}"{extra}];')
        for a, b, data in self.graph.edges(data=True):
            lines.append(f'  "{a}" -> "{b}" [label="{", ".join(data["tags"])}", fontsize=9];')
        for kind, sequences in (("path", self.config.paths), ("endpath", self.config.endpaths)):
            for name, labels in sequences.items():
                for a, b in zip(labels, labels[1:]):
                    lines.append(f'  "{a}" -> "{b}" [style=dashed, color=gray, '
                                 f'label="{kind} {name}", fontsize=8];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write DOT; for a ``.png`` or ``.svg`` name, render with graphviz when present."""
        path = Path(path)
        dot_text = self.to_dot()
        if path.suffix in (".png", ".svg", ".pdf"):
            dot = shutil.which("dot")
            if dot is None:
                fallback = path.with_suffix(".dot")
                fallback.write_text(dot_text)
                return fallback
            subprocess.run([dot, f"-T{path.suffix[1:]}", "-o", str(path)], input=dot_text,
                           text=True, check=True)
            return path
        path.write_text(dot_text)
        return path
