def tiny_overrides(data_root, run_dir, *extra):
    """A VL2Lite run small enough for a CPU test: tiny random teacher, 32 px, two epochs."""
    return [
        "data=cub",
        f"data.root={data_root}",
        "data.num_classes=3",
        "data.image_size=32",
        "data.resize_size=36",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_fraction=0.2",
        "teacher=tiny",
        "student.pretrained=false",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "optim.lr=1e-3",
        f"run_dir={run_dir}",
        *extra,
    ]
