"""dataset_builder: turn OCT data (synthetic, image/mask folders, nnU-Net raw datasets) into the octsam DatasetDict.

Run ``python -m dataset_builder {synthetic,folder,nnunet} --help``. The result loads with
``octsam.data.load_oct_dataset``.
"""
