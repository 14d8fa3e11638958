"""The split contract (`splits.json`): parsing, bad files, discovery, `fedliver check`, and what a
site trains and evaluates on (training never sees a validation or test case)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.site import SiteData, SiteIdentity
from common.discovery import index_dataset
from common.phases import LABELED_PHASE
from common.planning import default_test_plans
from common.splits import read_splits, write_splits
from fedliver.cli import main
from simulations.phantoms import PhantomConfig, generate_liqa_tree
from test_discovery import make_case

IDS = ("0001-A-S1", "0002-A-S2", "0003-A-S3", "0004-A-S4")


def _splits_file(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "splits.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_read_splits_good_and_missing(tmp_path):
    path = _splits_file(tmp_path, {"validation": ["0003-A-S3"], "test": ["0004-A-S4", "0001-A-S1", "0004-A-S4"]})
    splits, problems = read_splits(path, IDS)
    assert splits == {"0003-A-S3": "validation", "0004-A-S4": "test", "0001-A-S1": "test"}
    assert problems == []
    assert read_splits(tmp_path / "absent.json", IDS) == ({}, [])
    (tmp_path / "w").mkdir()
    written = write_splits(tmp_path / "w", validation=["0002-A-S2"], test=["0003-A-S3"])
    assert read_splits(written, IDS) == ({"0002-A-S2": "validation", "0003-A-S3": "test"}, [])


@pytest.mark.parametrize(
    "content, splits, message",
    [
        ('{"validation": ["0001-A-S1"],', {}, "not valid JSON (Expecting"),
        (["0001-A-S1"], {}, 'expected {"validation": [case ids], "test": [case ids]}, got a JSON list; ignored: every case trains'),
        ({"validation": "0001-A-S1", "test": ["0002-A-S2"]}, {"0002-A-S2": "test"}, "'validation' is not a list of case ids (ignored)"),
        ({"train": ["0001-A-S1"], "test": ["0002-A-S2"]}, {"0002-A-S2": "test"}, "unknown key 'train' (ignored; the keys are validation, test)"),
        ({"test": ["0002-A-S2", "0099-A-S1", "0100-A"]}, {"0002-A-S2": "test"}, "unknown case ids under 'test': 0099-A-S1, 0100-A (ignored)"),
        ({"validation": ["0001-A-S1", "0002-A-S2"], "test": ["0002-A-S2"]}, {"0001-A-S1": "validation", "0002-A-S2": "test"},
         "listed under both validation and test: 0002-A-S2 (taken as test)"),
    ],
)
def test_bad_split_files_give_one_line_naming_the_file(tmp_path, content, splits, message):
    path = _splits_file(tmp_path, content)
    got, problems = read_splits(path, IDS)
    assert got == splits
    [problem] = problems
    line = str(problem)
    assert "\n" not in line and line.startswith(f"{path}: ") and message in line, line


@pytest.fixture()
def liqa(tmp_path: Path) -> Path:
    root = tmp_path / "LiQA"
    for case in IDS:
        make_case(root / "Vendor_A" / case, ("GED4", "T1"), ("GED4", "T1") if case == "0004-A-S4" else ("GED4",))
    make_case(root / "Vendor_B1" / "0001-B1", ("GED4", "T2"), ())
    write_splits(root / "Vendor_A", validation=["0003-A-S3"], test=["0004-A-S4"])
    return root


def test_discovery_gives_each_case_its_split(liqa):
    index = index_dataset(liqa)
    assert index.problems == []  # splits.json is no "unexpected file"
    assert {c.case_id: c.split for c in index.cases} == {
        "0001-A-S1": "train", "0002-A-S2": "train", "0003-A-S3": "validation", "0004-A-S4": "test", "0001-B1": "train"}
    # the same from the vendor folder itself, and without validation
    assert [c.split for c in index_dataset(liqa / "Vendor_A", validate=False).cases] == ["train", "train", "validation", "test"]


def test_nnunet_raw_splits_beside_dataset_json(tmp_path):
    from test_discovery import blob, image, write

    root = tmp_path / "Dataset104"
    for name in ("a", "b", "c"):
        write(root / "imagesTr" / f"{name}_0000.nii.gz", image())
        write(root / "labelsTr" / f"{name}.nii.gz", blob())
    write_splits(root, validation=["b"], test=["c", "zz"])
    index = index_dataset(root)
    assert [(c.case_id, c.split) for c in index.cases] == [("a", "train"), ("b", "validation"), ("c", "test")]
    assert [str(p) for p in index.problems] == [f"{root / 'splits.json'}: unknown case id under 'test': zz (ignored)"]


def test_check_reports_split_sizes_and_bad_split_files(liqa, capsys):
    assert main(["check", str(liqa)]) == 0
    lines = capsys.readouterr().out.splitlines()
    a, b1 = lines.index("center A: 4 cases, 4 labeled"), lines.index("center B1: 1 case, 0 labeled")
    assert "  split: 2 train, 1 validation, 1 test" in lines[a:b1]
    assert "  split: 1 train, 0 validation, 0 test" in lines[b1:]
    (liqa / "Vendor_A" / "splits.json").write_text("{not json")
    assert main(["check", str(liqa)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "  split: 4 train, 0 validation, 0 test" in lines
    assert lines[-2] == "1 problem"
    assert lines[-1].startswith(f"{liqa / 'Vendor_A' / 'splits.json'}: not valid JSON (")
    assert lines[-1].endswith("; ignored: every case trains")


# ----------------------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split_phantoms")
    generate_liqa_tree(root, PhantomConfig(centers=("A", "C"), cases=2, labeled=1, seed=5, heldout=("C",),
                                           test_cases=1, validation_cases=1))
    return root


def _site(root: Path, center: str, role: str, tmp_path: Path) -> SiteData:
    return SiteData(SiteIdentity(site=center, role=role, data_dir=root, cache_dir=tmp_path / "cache",
                                 output_dir=tmp_path, centers=(center,)))


def test_training_site_trains_on_the_train_split_only(phantoms, tmp_path, one_thread):
    site = _site(phantoms, "A", "train", tmp_path)
    splits = {c.case_id: c.split for c in site.cases}
    train = {case for case, split in splits.items() if split == "train"}
    assert sorted(splits.values()) == ["test", "train", "train", "validation"]
    assert all(c.masks for c in site.cases if c.split != "train")  # labeled: they would be trained on

    [(labeled, phase)] = site.labeled_pairs()  # the one labeled training case
    assert (labeled.split, labeled.case_id[:4], phase) == ("train", "0001", LABELED_PHASE)
    assert {c.case_id for c, _ in site.labeled_pairs() + site.unlabeled_pairs()} == train
    held_out_files = {f for c in site.cases if c.split != "train" for f in [*c.images.values(), *c.masks.values()]}
    fingerprinted = {f for pair in site.fingerprint_pairs() for f in pair if f is not None}
    assert fingerprinted and not fingerprinted & held_out_files

    # what the trainer would get: the preprocessed volumes' case ids
    volumes = site.training_volumes(default_test_plans(spacing=(8.0, 6.0, 6.0)))
    assert volumes.problems == []
    assert volumes.labeled and volumes.unlabeled
    assert {v.case_id for v in volumes.labeled + volumes.unlabeled} == train
    assert [(v.case_id, v.phase) for v in volumes.labeled] == [(c.case_id, p) for c, p in site.labeled_pairs()]

    [(validation, phase)] = site.validation_pairs()
    assert (validation.split, phase) == ("validation", LABELED_PHASE)
    test_pairs = site.test_pairs()
    [test_case] = site.cases_in("test")
    assert [p for _, p in test_pairs] == list(test_case.masks) == list(test_case.images)  # every phase present
    assert {c.case_id for c, _ in test_pairs} == {test_case.case_id}


def test_heldout_site_has_only_test_cases(phantoms, tmp_path):
    site = _site(phantoms, "C", "eval", tmp_path)
    assert len(site.cases) == 2
    assert site.labeled_pairs() == [] and site.unlabeled_pairs() == [] and site.fingerprint_pairs() == []
    assert site.validation_pairs() == [] and site.cases_in("train") == []
    assert site.test_pairs() == [(c, p) for c in site.cases for p in c.masks]
    assert len(site.test_pairs()) >= 2 * 2
    with pytest.raises(ValueError, match="unknown split"):
        site.cases_in("holdout")
