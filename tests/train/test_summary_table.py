"""format_table and format_key_values: exact text, alignment, number formatting, blanks."""

import numpy as np

from mllm_jax.train.summary_table import format_cell, format_key_values, format_table


def test_table_aligns_numbers_right_and_text_left_with_blank_missing_cells():
    rows = [
        {"name": "baseline", "step": 1000, "loss": 2.345678},
        {"name": "lora", "step": np.int64(200), "loss": np.float32(1.5), "accuracy": 0.25},
    ]
    assert format_table(rows) == (
        "name      step    loss  accuracy\n"
        "--------------------------------\n"
        "baseline  1000  2.3457\n"
        "lora       200  1.5000    0.2500"
    )


def test_table_with_chosen_columns_and_float_format():
    rows = [{"run": "a", "lr": 0.0003, "extra": "x"}, {"run": "bb", "lr": None}]
    assert format_table(rows, ["lr", "run", "absent"], float_format=".1e") == (
        "     lr  run  absent\n--------------------\n3.0e-04  a\n         bb"
    )


def test_a_column_with_any_text_is_left_aligned_and_bools_are_text():
    rows = [{"value": 12345, "ok": True}, {"value": "n/a", "ok": False}]
    assert format_table(rows) == "value  ok\n------------\n12345  True\nn/a    False"


def test_empty_tables():
    assert format_table([]) == ""
    assert format_table([], ["step", "loss"]) == "step  loss\n----------"


def test_format_cell():
    assert [format_cell(v) for v in (None, 3, np.int32(-4), 0.5, float("nan"), "s")] == [
        "",
        "3",
        "-4",
        "0.5000",
        "nan",
        "s",
    ]


def test_key_values_put_values_in_one_column_under_a_title():
    text = format_key_values(
        {"steps": 1000, "final_loss": 2.345678, "config": "llava_tiny", "note": None},
        "Run summary",
    )
    assert text == (
        "Run summary\n"
        "-----------------------\n"
        "steps        1000\n"
        "final_loss   2.3457\n"
        "config       llava_tiny\n"
        "note"
    )


def test_key_values_rule_is_at_least_the_title_width():
    assert format_key_values({"a": 1}, "A long title") == (
        "A long title\n---------------\na             1"
    )
    assert format_key_values({}, "Empty").splitlines()[0] == "Empty"


def test_text_is_printed_as_is_without_markup_emoji_colour_or_wrapping():
    rows = [{"note": "[bold]x[/bold] :smile:", "value": 1.0}, {"note": "y" * 300, "value": 2.0}]
    lines = format_table(rows).splitlines()
    assert lines[2] == "[bold]x[/bold] :smile:".ljust(300) + "  1.0000"
    assert lines[3] == "y" * 300 + "  2.0000"
    assert "\x1b" not in format_table(rows)
