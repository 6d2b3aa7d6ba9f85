"""The kcore Streamlit dashboard: ``streamlit run dashboard/app.py``."""
