"""The depth plot with its table and exports: one view for a layer sweep and for saved runs compared side by side."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
import streamlit as st

from kcore import export
from kcore.sweep import SweepRow, rows_csv, rows_table
from kcore.viz.depth import depth_figure, depth_figure_interactive


def draw(rows: Sequence[SweepRow], *, key: str, x_title: str, caption: str, provenance: Mapping[str, Any],
         stem: str) -> None:
    """Draw the interactive depth plot of ``rows``, their table, and download buttons: the figure as PDF, SVG and
    PNG (matplotlib, with ``caption`` under it) and the table as CSV with ``provenance`` in its ``#`` lines.

    Args:
        rows: :class:`kcore.sweep.SweepRow` rows. key: a prefix for the widget keys. x_title: the x axis' title.
        caption: the exported figure's provenance line. provenance: the CSV's header entries. stem: the file stem.
    """
    st.plotly_chart(depth_figure_interactive(rows, x_title=x_title), key=f"{key}_plot", width="stretch")
    columns, flat = rows_table(rows)
    st.dataframe(pd.DataFrame(flat, columns=columns), hide_index=True, key=f"{key}_table")
    cols = st.columns(4)
    for col, fmt in zip(cols, ("pdf", "svg", "png")):
        col.download_button(f"Figure {fmt.upper()}", key=f"{key}_dl_{fmt}", file_name=f"{stem}.{fmt}",
                            mime=export.MIME[fmt], icon=":material/download:",
                            data=lambda fmt=fmt: export.figure_bytes(
                                depth_figure(rows, x_title=x_title, caption=caption), fmt, 300))
    cols[3].download_button("Table CSV", key=f"{key}_dl_csv", file_name=f"{stem}.csv", mime=export.MIME["csv"],
                            data=rows_csv(rows, provenance), icon=":material/download:")
