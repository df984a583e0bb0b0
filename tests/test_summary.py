"""The start-up summary block shared by every command."""

import io

from cascade.summary import format_count, format_summary, print_summary, read_summary


def test_counts_take_si_suffixes():
    assert format_count(512) == "512"
    assert format_count(1234567) == "1.23M"
    assert format_count(2.5e9) == "2.5G"
    assert format_count(3_000) == "3k"


def test_block_aligns_names_and_drops_missing_values():
    text = format_summary("train base32", [("device", "cpu"), ("skipped", None), ("parameters", "1.2M")])
    assert text.splitlines() == ["train base32", "  device     : cpu", "  parameters : 1.2M"]


def test_print_goes_to_the_given_stream():
    out = io.StringIO()
    print_summary("sample", [("stages", "base32")], file=out)
    assert out.getvalue() == "sample\n  stages : base32\n"


def test_rows_read_back_from_a_log():
    text = "a log line\n" + format_summary("train", [("device", "cpu"), ("time budget", "600 s")]) + "\nstep 1/3"
    assert read_summary(text) == {"device": "cpu", "time budget": "600 s"}
