"""Training, installed as beit_fast.train: shared components (config, runtime, run, optim, step, engine, evaluate,
metrics) and the scripts that wire them (pretrain, finetune + classify, train_tokenizer). Library modules of
beit_fast never import from here."""
