"""Hardware limits kernels tile against, as Python ints (in real NKI `nl.tile_size.*` are traced values).

Each constant is named after the limit it respects; figures from ../shared/reference/nki-api.md.
"""
P_MAX = 128                      # partitions of SBUF/PSUM; also matmul K (contraction) per instruction
GEMM_STATIONARY_FMAX = 128       # matmul stationary free size M per instruction
GEMM_MOVING_FMAX = 512           # matmul moving free size N per instruction (fp32 PSUM result, trn1/trn2)
PSUM_BANK_BYTES = 2048           # bytes per partition of one PSUM bank
PSUM_NUM_BANKS = 8               # PSUM banks per partition
PSUM_FMAX_FP32 = PSUM_BANK_BYTES // 4     # fp32 elements per partition in one bank (= 512)
PE_TRANSPOSE_MAX = 128           # TensorE transpose: up to 128 x 128
DVE_TRANSPOSE_MAX = 32           # VectorE transpose: up to 32 x 32
SBUF_BYTES_PER_PARTITION = {"trn1": 180224, "trn2": 212984, "trn3": 245752}   # usable, [U] in the reference
# targets (NeuronCore-v2) whose TensorE has 64 / 128-row and -column tiles only: no 32x32 `tile_position` tiles
NO_PE_TILE32_TARGETS = ("trn1",)
# targets (NeuronCore-v2) whose TensorE transpose is a matmul by the identity, not bit-exact with NaN / Inf: 0 x NaN
# from one row of the input reaches every column of the result (the nc_transpose docstring)
NAN_MIXING_PE_TRANSPOSE_TARGETS = ("trn1",)
# targets (NeuronCore-v2) whose compute instructions on <= 32 partitions start only at partition 0 / 32 / 64 / 96
# (33-64 at 0 / 64, more at 0): per-head rows on partition 2h are not addressable there
ALIGNED_START_PARTITION_TARGETS = ("trn1",)
# targets (NeuronCore-v2) whose activation bias must be a [P, 1] tile (a float bias needs NeuronCore-v3+)
TILE_ACTIVATION_BIAS_TARGETS = ("trn1",)
# targets (NeuronCore-v2) without `nisa.range_select` ("available only on NeuronCore-v3 and newer", its docstring)
NO_RANGE_SELECT_TARGETS = ("trn1",)
# targets (NeuronCore-v2) without a hardware DGE: every dynamic DMA's descriptors are written by GpSimd (software DGE;
# hardware DGE from NeuronCore-v3, nki-dge.rst, which the emulator's dma_copy enforces)
SOFTWARE_DGE_ONLY_TARGETS = ("trn1",)
# bytes per partition row below which a DMA packet moves at less than the engines' full rate (cost model v11's
# packet knee, docs/cost-model.md "DMA"): kernels that choose a layout by row size read it per target
DMA_FULL_RATE_ROW_BYTES = {"trn1": 2560, "trn2": 512, "trn3": 512}
# VectorE elements per partition per cycle (base rate, before performance mode): 1 on NeuronCore-v2, 2 on v3 / v4 (the
# cost model's `dve_elems_pp_per_cycle` per target; tests/moe/test_moe_blockwise.py ties the two)
DVE_ELEMS_PER_CYCLE = {"trn1": 1.0, "trn2": 2.0, "trn3": 2.0}
NEG_INF = -3.4028235e38          # most negative fp32, the literal NKI kernels use for -inf
