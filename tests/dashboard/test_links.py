"""Findings linked to the rows that carry their evidence (``dashboard.links``): the list of
findings above the figure and the rows each one links to."""

from __future__ import annotations

from tests.synth import full_series, write_run
from trainprobe.analysis.findings import Finding, Severity
from trainprobe.dashboard import build, to_html
from trainprobe.dashboard.links import DIV_ID, META_KEY, findings_block


def finding(keys, **overrides) -> Finding:
    fields = {
        "detector": "loss_spike",
        "severity": Severity.WARNING,
        "start_step": 100,
        "end_step": 120,
        "message": "loss <b>jumped</b>",
        "action": "clip & retry",
        "keys": keys,
    }
    return Finding(**{**fields, **overrides})


def test_findings_link_to_the_rows_carrying_their_evidence(tmp_path):
    run = write_run(tmp_path / "r", full_series())
    fig = build(
        run,
        [
            finding(("scalars/loss",)),
            finding(("norms/grad/*",), start_step=5, end_step=5),
            finding(()),
        ],
    )
    meta = fig.layout.meta[META_KEY]
    titles = [row["title"] for row in meta["rows"]]
    assert titles[0] == "Findings"
    linked = [[titles[i] for i in f["rows"]] for f in meta["findings"]]
    assert linked[0] == ["Loss and scalars"]
    assert linked[1] == ["Gradient norm per parameter"]
    assert linked[2] == []
    assert [row["axis"] for row in meta["rows"]] == [
        "yaxis" if i == 0 else f"yaxis{i + 1}" for i in range(len(titles))
    ]
    page = to_html(fig)
    assert f'id="{DIV_ID}"' in page
    block = findings_block(meta)
    assert block in page and page.index(block) < page.index(f'id="{DIV_ID}"')
    assert "loss &lt;b&gt;jumped&lt;/b&gt;" in block and "clip &amp; retry" in block
    assert block.count("data-row=") == 3  # no keys: linked to the findings timeline
    assert '<b style="color:#ff7f0e">WARNING</b>' in block  # the severity's own colour
    uids = [t.uid for t in fig.data]
    assert len(set(uids)) == len(uids) and uids[0] == "findings-0"  # stable across redraws
    assert ">Findings</a>" in block


def test_no_findings_no_list(tmp_path):
    run = write_run(tmp_path / "r", full_series())
    page = to_html(build(run))
    assert 'id="tp-findings"' not in page
