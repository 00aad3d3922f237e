"""Training, installed as beit_fast.train: shared components (config, runtime, run, optim, step, engine, loop,
evaluate, metrics) and the scripts that wire them (pretrain, finetune + classify, segment, train_tokenizer). Library
modules of beit_fast never import from here."""
