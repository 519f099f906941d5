"""Reporting: paper tables from MLflow runs (table, table_render), statistics (stats) and plots."""
