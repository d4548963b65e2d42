"""Before a run: input files and their footers → shards (whole row groups or pieces), the pieces' server,
the input files recorded for resume, where actors fit, the recorded auto batch size.
"""
