namespace LoRAHub.Torch;

// Op codes shared with native/src/lh_ops.cpp; the order must match the C++ enums.

internal enum UnaryOp
{
    Neg, Abs, Exp, Log, Sqrt, Rsqrt, Sin, Cos, Tanh, Sigmoid,
    Relu, Silu, Gelu, GeluTanh, Square, Reciprocal, Floor, Ceil, Round, Sign,
    Log1p, Contiguous, Clone, Detach, LogicalNot, IsNan, IsInf, IsFinite, Erf, Trunc,
    Expm1, T,
}

internal enum BinaryOp
{
    Add, Sub, Mul, Div, Pow, Maximum, Minimum, Eq, Ne, Lt,
    Le, Gt, Ge, Matmul, LogicalAnd, LogicalOr, Remainder, Atan2, FloorDivide, RSub,
    RDiv, RPow, BitwiseAnd, BitwiseOr, BitwiseXor, LShift, RShift,
}

internal enum ReduceOp { Sum, Mean, Amax, Amin, Prod, Std, Var, LogSumExp, Any, All, Norm }

/// <summary>Loss reductions, numbered as libtorch's at::Reduction.</summary>
public enum Reduction { None = 0, Mean = 1, Sum = 2 }
