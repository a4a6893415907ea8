"""Orchestration (Prefect only): the retraining flow, schedules, concurrency
slots, and the `rcnnops` command that starts them."""
