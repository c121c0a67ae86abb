"""The seed's system: daily OHLC series, the BiLSTM encoder, multi-task pretraining, the logistic baseline."""
