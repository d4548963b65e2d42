"""Who may write where: claiming an output (user files, another job's records, `--overwrite`) and the
locations a job must never write to.
"""
