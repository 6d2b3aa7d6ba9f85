"""kcore dashboard (placeholder page until the full dashboard lands)."""
import streamlit as st

st.set_page_config(page_title="kcore", layout="wide")
st.title("kcore — knowledge consistency")
st.write("The full dashboard is being built. Use the Python API or the `kcore` command meanwhile.")
