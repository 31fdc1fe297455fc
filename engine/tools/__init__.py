"""What operators run over a log: simulate and its workload, replicas, backtest, report, audit and the
promise check. Imports the facade and everything below it.
"""
