"""Phase lists of run configs and command lines (`evaluate-phases`)."""

import pytest

from common.phases import PHASES, parse_phase_list


def test_phase_lists_parse_and_star_means_all():
    assert parse_phase_list("GED4, T1,DWI_800") == ("GED4", "T1", "DWI_800")
    assert parse_phase_list("*") is None and parse_phase_list("") is None
    assert set(PHASES) >= {"GED4", "T1", "T2", "DWI_800"}


def test_an_unknown_phase_is_named():
    with pytest.raises(ValueError, match="evaluate-phases: unknown phase\\(s\\) T7"):
        parse_phase_list("GED4,T7", "evaluate-phases")
