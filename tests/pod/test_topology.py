import pytest

from moe.pod.topology import KINDS, device_coords, get_slice, parse_slice


@pytest.mark.parametrize(
    "text, chips, wrap",
    [
        ("tpu-v3:4x4", 16, (False, False)),
        ("tpu-v3:32x32", 1024, (True, True)),
        ("tpu-v2:16x16", 256, (True, True)),
        ("tpu-v4:2x2x4", 16, (False, False, False)),
        ("tpu-v4:4x4x8", 128, (True, True, True)),
        ("tpu-v5e:4x8", 32, (False, False)),
        ("gpu-h100:8", 8, (False,)),
        ("cpu:8", 8, (False,)),
        ("cpu:2x4", 8, (False,)),
    ],
)
def test_parse_slice_gives_chips_and_wraparound(text, chips, wrap):
    s = parse_slice(text)
    assert s.num_chips == chips
    assert s.wraparound == wrap


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("tpu-v3:3x3", "valid slices: 2x2, 4x4"),
        ("tpu-v4:4x4", "3 dims"),
        ("tpu-v4:6x6x6", "multiples of 4"),
        ("tpu-v4:4x4x32", "multiples of 4 up to 16"),
        ("tpu-v9:4x4", "unknown pod topology 'tpu-v9'"),
        ("gpu-h100:16", "no slice '16'"),
        ("tpu-v3", "TOPOLOGY:SHAPE"),
        ("tpu-v3:4xa", "not a shape"),
        ("cpu:0", "positive"),
    ],
)
def test_bad_slices_raise_one_clear_line(text, fragment):
    with pytest.raises(ValueError, match=None) as err:
        parse_slice(text)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_no_slice_means_one_chip():
    assert get_slice("tpu-v3").num_chips == 1
    assert get_slice("cpu", None).num_chips == 1


def test_every_figure_has_a_source_and_uncited_ones_say_unverified():
    for kind in KINDS.values():
        assert kind.chip.sources, kind.name
        for text in kind.chip.sources.values():
            assert any(m in text for m in ("[D]", "[S]", "UNVERIFIED", "[D-implied]", "nominal"))


def test_documented_tpu_figures_match_papers_sheet():
    assert KINDS["tpu-v3"].chip.peak_flops == 123e12
    assert KINDS["tpu-v4"].chip.peak_flops == 275e12
    assert KINDS["tpu-v3"].chip.hbm_bandwidth == 900e9
    assert KINDS["tpu-v4"].chip.links_per_chip == 6


def test_device_coords_are_row_major():
    s = parse_slice("tpu-v4:2x2x4")
    assert device_coords(s, 0) == (0, 0, 0)
    assert device_coords(s, 5) == (0, 1, 1)
    assert device_coords(s, 15) == (1, 1, 3)
