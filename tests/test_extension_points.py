"""The engine's extension points (recorun/framework/hookspecs.py) and the pieces the SONIC side
shares: a plugin's hooks from the command line to the report, sources cut into chunks, the one
rule for merging model descriptions, the child-process helper."""
from __future__ import annotations

import json
import signal
import sys
import textwrap
import time

import numpy as np
import pytest

from recorun import ConfigError, EmptySource, hookimpl
from recorun.framework.cli import main
from recorun.framework.executors import JobExecutor, LocalExecutor
from recorun.framework.hooks import merged, plugin_manager
from recorun.processes import ChildProcess, group_alive
from recorun.sonic_clients import ClientConfigError, ModelDescription, TensorInfo
from recorun.sonic_clients.base import merge_descriptions

WORKFLOW = """
process: {report_every_s: 0}
source: {type: EmptySource, count: 12}
modules:
  prescale: {type: PrescaleFilter, prescale: 3}
paths:
  sampled: [prescale]
"""


class TaggingPlugin:
    """A plugin of every hook the command line calls: an option, the overrides it stands for,
    a check, an executor, a report section and its text."""

    def __init__(self):
        self.executed = []

    @hookimpl
    def recorun_add_options(self, parser):
        parser.add_argument("--tag", help="a label for the job")

    @hookimpl
    def recorun_check_options(self, options):
        if options.tag == "bad":
            raise ConfigError("--tag bad is not allowed")

    @hookimpl
    def recorun_workflow_overrides(self, options):
        return [f"process.name={options.tag}"] if options.tag else None

    @hookimpl
    def recorun_executors(self):
        plugin = self

        class Recording(LocalExecutor):
            name = "recording"

            def run(self, request):
                plugin.executed.append(request.workflow)
                return super().run(request)
        return {"recording": Recording}

    @hookimpl
    def recorun_report_sections(self, report, options):
        return {"tagging": {"tag": getattr(options, "tag", None), "process": report["process"],
                            "accepted": report["events"]["accepted"]}}

    @hookimpl
    def recorun_text_report(self, report):
        return f"TagReport {report['tagging']['tag']}: {report['tagging']['accepted']} accepted"


@pytest.fixture
def plugin():
    manager = plugin_manager()
    instance = TaggingPlugin()
    manager.register(instance, name="test-tagging")
    try:
        yield instance
    finally:
        manager.unregister(instance)


@pytest.fixture
def workflow_file(tmp_path):
    path = tmp_path / "prescaled.yaml"
    path.write_text(WORKFLOW)
    return path


def test_a_plugins_hooks_from_the_command_line_to_the_report(plugin, workflow_file, tmp_path,
                                                              capsys):
    report_path = tmp_path / "report.json"
    assert main([str(workflow_file), "--tag", "run7", "--executor", "recording",
                 "--report-json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert plugin.executed == [str(workflow_file)]
    assert report["process"] == "run7"                               # the override
    assert report["tagging"] == {"tag": "run7", "process": "run7",
                                 "accepted": report["events"]["accepted"]}
    assert report["events"]["accepted"] == 4                         # every 3rd of 12
    out = capsys.readouterr().out
    assert out.index("TimeReport") < out.index("TagReport run7: 4 accepted")


def test_a_plugins_check_stops_the_job_with_exit_code_2(plugin, workflow_file, capsys):
    assert main([str(workflow_file), "--tag", "bad"]) == 2
    err = capsys.readouterr().err
    assert "configuration error: --tag bad is not allowed" in err
    assert "events read" not in err


def test_without_the_plugin_its_option_does_not_exist(workflow_file, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(workflow_file), "--tag", "x"])
    assert stop.value.code == 2 and "--tag" in capsys.readouterr().err


def test_two_plugins_giving_one_name_are_a_configuration_error():
    with pytest.raises(ConfigError, match="two recorun plugins provide 'dask'"):
        merged([{"dask": JobExecutor}, {"dask": LocalExecutor}])


def test_recorun_list_names_the_plugins_and_executors(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "executors: dask, local" in out
    assert "plugins (recorun.plugins): farm, monitoring, sonic" in out


# -- sources cut into chunks ----------------------------------------------------------------------

def test_an_empty_source_cuts_into_chunks_numbered_as_one_job():
    source = EmptySource(count=25, first_event=100)
    chunks = source.chunks(max_events=22, size=10)
    assert [(c.first_index, c.size) for c in chunks] == [(0, 10), (10, 12)]
    assert [c.parameters for c in chunks] == [{"count": 10, "first_event": 100},
                                              {"count": 12, "first_event": 110}]
    assert chunks[1].describe() == "events 10 to 21"


def test_a_source_that_cannot_be_cut_says_so(tmp_path):
    from recorun import Source
    from recorun.framework.build import build_workflow
    from recorun.framework.chunked import plan_chunks
    from recorun.framework.config import parse_workflow

    class Endless(Source):
        def next_event(self, index):
            return None

    built = build_workflow(parse_workflow({"source": {"type": Endless}, "modules": {}}, "w.yaml"))
    with pytest.raises(ConfigError, match="source type Endless cannot be cut"):
        plan_chunks(built, 10)


# -- SONIC: one rule for model descriptions from several servers ----------------------------------

def description(source: str, shape=(15,), max_batch=100) -> ModelDescription:
    def tensor(name, dims):
        return {name: TensorInfo(name, dims, np.dtype("float32"), "FP32")}
    return ModelDescription("facile", "", tensor("hcal_channels", shape), tensor("energy", (1,)),
                            max_batch, source)


def test_descriptions_merge_to_the_smallest_batch_limit():
    merged_ = merge_descriptions("facile", [description("server 'a'", max_batch=100),
                                            description("server 'b'", max_batch=40)])
    assert merged_.max_batch_size == 40 and merged_.source == "server 'a'"


def test_servers_serving_different_tensors_are_named_in_a_configuration_error():
    with pytest.raises(ClientConfigError, match="server 'a' and server 'b' serve different"):
        merge_descriptions("facile", [description("server 'a'"),
                                      description("server 'b'", shape=(16,))])


# -- the child-process helper ---------------------------------------------------------------------

STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("READY", flush=True)
    time.sleep(60)
""")


def test_a_child_that_ignores_sigterm_is_killed_with_its_whole_group():
    child = ChildProcess([sys.executable, "-c", STUBBORN], name="stubborn").start()
    assert child.read_line(30) == "READY"
    began = time.monotonic()
    code = child.stop(timeout_s=1.0)
    assert code == -signal.SIGKILL and time.monotonic() - began < 20
    assert not group_alive(child.pid)                 # its grandchild went too


def test_a_child_that_stops_on_sigterm_exits_cleanly_and_stop_is_idempotent():
    child = ChildProcess([sys.executable, "-c", "import time; print('READY', flush=True); "
                                                "time.sleep(60)"], name="polite").start()
    assert child.read_line(30) == "READY"
    assert child.stop() == -signal.SIGTERM
    assert child.stop() == -signal.SIGTERM and not child.running


class CarelessPlugin:
    """A plugin whose section would replace the report's events, and one hook that raises."""

    @hookimpl
    def recorun_report_sections(self, report, options):
        return {"events": "gone", "careful": True}

    @hookimpl
    def recorun_text_report(self, report):
        raise RuntimeError("a bug in a plugin")


def test_a_careless_plugin_cannot_spoil_or_lose_the_report(workflow_file, tmp_path, caplog):
    manager = plugin_manager()
    careless = CarelessPlugin()
    manager.register(careless, name="test-careless")
    try:
        report_path = tmp_path / "report.json"
        assert main([str(workflow_file), "--report-json", str(report_path)]) == 0
    finally:
        manager.unregister(careless)
    report = json.loads(report_path.read_text())
    assert report["events"]["read"] == 12 and report["careful"] is True
    assert "plugin test-careless's report section 'events' is left out" in caplog.text
    assert "plugin test-careless failed in recorun_text_report" in caplog.text
