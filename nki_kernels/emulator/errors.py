"""The one exception type the emulator raises for kernels that would be illegal on the device."""


class EmulatorCheckError(Exception):
    """A kernel broke a hardware rule or an API contract of NKI.

    The message always names the instruction, the operand and the limit, e.g.
    ``nc_matmul: operand 'moving': free size N=1024 exceeds the limit 512 (gemm_moving_fmax on trn2)``.
    """

    def __init__(self, instruction: str, operand: str | None, message: str):
        self.instruction = instruction
        self.operand = operand
        where = f"{instruction}: operand '{operand}': " if operand else f"{instruction}: "
        super().__init__(where + message)


def fail(instruction: str, operand: str | None, message: str):
    raise EmulatorCheckError(instruction, operand, message)
