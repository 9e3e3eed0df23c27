namespace LoRAHub.Torch;

// Elementwise math, reductions and operators. Names follow PyTorch/TorchSharp.
public sealed unsafe partial class Tensor
{
    internal Tensor Unary(UnaryOp op) => new(Native.lh_unary((int)op, Handle));

    private Tensor UnaryInPlace(UnaryOp op)
    {
        Native.Check(Native.lh_unary_((int)op, Handle));
        return this;
    }

    internal Tensor Binary(BinaryOp op, Tensor other, double alpha = 1.0) =>
        new(Native.lh_binary((int)op, Handle, other.Handle, alpha));

    internal Tensor BinaryScalar(BinaryOp op, double value, bool integral = false) =>
        new(Native.lh_binary_scalar((int)op, Handle, value, integral ? 1 : 0));

    private Tensor BinaryInPlace(BinaryOp op, Tensor other, double alpha = 1.0)
    {
        Native.Check(Native.lh_binary_((int)op, Handle, other.Handle, alpha));
        return this;
    }

    private Tensor BinaryScalarInPlace(BinaryOp op, double value)
    {
        Native.Check(Native.lh_binary_scalar_((int)op, Handle, value, 0));
        return this;
    }

    // unary
    public Tensor neg() => Unary(UnaryOp.Neg);
    public Tensor abs() => Unary(UnaryOp.Abs);
    public Tensor exp() => Unary(UnaryOp.Exp);
    public Tensor log() => Unary(UnaryOp.Log);
    public Tensor sqrt() => Unary(UnaryOp.Sqrt);
    public Tensor rsqrt() => Unary(UnaryOp.Rsqrt);
    public Tensor sin() => Unary(UnaryOp.Sin);
    public Tensor cos() => Unary(UnaryOp.Cos);
    public Tensor tanh() => Unary(UnaryOp.Tanh);
    public Tensor sigmoid() => Unary(UnaryOp.Sigmoid);
    public Tensor relu() => Unary(UnaryOp.Relu);
    public Tensor silu() => Unary(UnaryOp.Silu);
    public Tensor gelu(string approximate = "none") => Unary(approximate == "tanh" ? UnaryOp.GeluTanh : UnaryOp.Gelu);
    public Tensor square() => Unary(UnaryOp.Square);
    public Tensor reciprocal() => Unary(UnaryOp.Reciprocal);
    public Tensor floor() => Unary(UnaryOp.Floor);
    public Tensor ceil() => Unary(UnaryOp.Ceil);
    public Tensor round() => Unary(UnaryOp.Round);
    public Tensor sign() => Unary(UnaryOp.Sign);
    public Tensor log1p() => Unary(UnaryOp.Log1p);
    public Tensor expm1() => Unary(UnaryOp.Expm1);
    public Tensor erf() => Unary(UnaryOp.Erf);
    public Tensor trunc() => Unary(UnaryOp.Trunc);
    public Tensor contiguous() => Unary(UnaryOp.Contiguous);
    public Tensor clone() => Unary(UnaryOp.Clone);
    public Tensor logical_not() => Unary(UnaryOp.LogicalNot);
    public Tensor isnan() => Unary(UnaryOp.IsNan);
    public Tensor isinf() => Unary(UnaryOp.IsInf);
    public Tensor isfinite() => Unary(UnaryOp.IsFinite);
    public Tensor t() => Unary(UnaryOp.T);
    public Tensor T => t();

    public Tensor neg_() => UnaryInPlace(UnaryOp.Neg);
    public Tensor exp_() => UnaryInPlace(UnaryOp.Exp);
    public Tensor sqrt_() => UnaryInPlace(UnaryOp.Sqrt);
    public Tensor relu_() => UnaryInPlace(UnaryOp.Relu);
    public Tensor sigmoid_() => UnaryInPlace(UnaryOp.Sigmoid);

    // binary with tensors
    public Tensor add(Tensor other, double alpha = 1.0) => Binary(BinaryOp.Add, other, alpha);
    public Tensor sub(Tensor other, double alpha = 1.0) => Binary(BinaryOp.Sub, other, alpha);
    public Tensor mul(Tensor other) => Binary(BinaryOp.Mul, other);
    public Tensor div(Tensor other) => Binary(BinaryOp.Div, other);
    public Tensor pow(Tensor exponent) => Binary(BinaryOp.Pow, exponent);
    public Tensor maximum(Tensor other) => Binary(BinaryOp.Maximum, other);
    public Tensor minimum(Tensor other) => Binary(BinaryOp.Minimum, other);
    public Tensor eq(Tensor other) => Binary(BinaryOp.Eq, other);
    public Tensor ne(Tensor other) => Binary(BinaryOp.Ne, other);
    public Tensor lt(Tensor other) => Binary(BinaryOp.Lt, other);
    public Tensor le(Tensor other) => Binary(BinaryOp.Le, other);
    public Tensor gt(Tensor other) => Binary(BinaryOp.Gt, other);
    public Tensor ge(Tensor other) => Binary(BinaryOp.Ge, other);
    public Tensor matmul(Tensor other) => Binary(BinaryOp.Matmul, other);
    public Tensor logical_and(Tensor other) => Binary(BinaryOp.LogicalAnd, other);
    public Tensor logical_or(Tensor other) => Binary(BinaryOp.LogicalOr, other);
    public Tensor remainder(Tensor other) => Binary(BinaryOp.Remainder, other);
    public Tensor atan2(Tensor other) => Binary(BinaryOp.Atan2, other);
    public Tensor floor_divide(Tensor other) => Binary(BinaryOp.FloorDivide, other);
    public Tensor bitwise_and(Tensor other) => Binary(BinaryOp.BitwiseAnd, other);
    public Tensor bitwise_or(Tensor other) => Binary(BinaryOp.BitwiseOr, other);
    public Tensor bitwise_xor(Tensor other) => Binary(BinaryOp.BitwiseXor, other);
    public Tensor bitwise_left_shift(Tensor other) => Binary(BinaryOp.LShift, other);
    public Tensor bitwise_right_shift(Tensor other) => Binary(BinaryOp.RShift, other);

    // binary with scalars (an integral scalar keeps integer tensors integral, as in PyTorch)
    public Tensor add(double value) => BinaryScalar(BinaryOp.Add, value);
    public Tensor add(long value) => BinaryScalar(BinaryOp.Add, value, integral: true);
    public Tensor sub(double value) => BinaryScalar(BinaryOp.Sub, value);
    public Tensor mul(double value) => BinaryScalar(BinaryOp.Mul, value);
    public Tensor mul(long value) => BinaryScalar(BinaryOp.Mul, value, integral: true);
    public Tensor div(double value) => BinaryScalar(BinaryOp.Div, value);
    public Tensor pow(double exponent) => BinaryScalar(BinaryOp.Pow, exponent);
    public Tensor clamp_min(double min) => BinaryScalar(BinaryOp.Maximum, min);
    public Tensor clamp_max(double max) => BinaryScalar(BinaryOp.Minimum, max);
    public Tensor eq(double value) => BinaryScalar(BinaryOp.Eq, value);
    public Tensor ne(double value) => BinaryScalar(BinaryOp.Ne, value);
    public Tensor lt(double value) => BinaryScalar(BinaryOp.Lt, value);
    public Tensor le(double value) => BinaryScalar(BinaryOp.Le, value);
    public Tensor gt(double value) => BinaryScalar(BinaryOp.Gt, value);
    public Tensor ge(double value) => BinaryScalar(BinaryOp.Ge, value);
    public Tensor remainder(long value) => BinaryScalar(BinaryOp.Remainder, value, integral: true);
    public Tensor floor_divide(long value) => BinaryScalar(BinaryOp.FloorDivide, value, integral: true);
    public Tensor bitwise_and(long value) => BinaryScalar(BinaryOp.BitwiseAnd, value, integral: true);
    public Tensor bitwise_or(long value) => BinaryScalar(BinaryOp.BitwiseOr, value, integral: true);

    public Tensor clamp(double? min = null, double? max = null) =>
        new(Native.lh_clamp(Handle, min ?? 0, max ?? 0, min.HasValue ? 1 : 0, max.HasValue ? 1 : 0));

    public Tensor where(Tensor condition, Tensor other) => new(Native.lh_where(condition.Handle, Handle, other.Handle));
    public Tensor masked_fill(Tensor mask, double value) => new(Native.lh_masked_fill(Handle, mask.Handle, value));
    public Tensor lerp(Tensor end, double weight) => new(Native.lh_lerp(Handle, end.Handle, weight));
    public Tensor addcmul(Tensor a, Tensor b, double value = 1.0) => new(Native.lh_addcmul(Handle, a.Handle, b.Handle, value));
    public Tensor addmm(Tensor a, Tensor b, double beta = 1.0, double alpha = 1.0) =>
        new(Native.lh_addmm(Handle, a.Handle, b.Handle, beta, alpha));

    // in place
    public Tensor add_(Tensor other, double alpha = 1.0) => BinaryInPlace(BinaryOp.Add, other, alpha);
    public Tensor sub_(Tensor other, double alpha = 1.0) => BinaryInPlace(BinaryOp.Sub, other, alpha);
    public Tensor mul_(Tensor other) => BinaryInPlace(BinaryOp.Mul, other);
    public Tensor div_(Tensor other) => BinaryInPlace(BinaryOp.Div, other);
    public Tensor add_(double value) => BinaryScalarInPlace(BinaryOp.Add, value);
    public Tensor sub_(double value) => BinaryScalarInPlace(BinaryOp.Sub, value);
    public Tensor mul_(double value) => BinaryScalarInPlace(BinaryOp.Mul, value);
    public Tensor div_(double value) => BinaryScalarInPlace(BinaryOp.Div, value);
    public Tensor pow_(double value) => BinaryScalarInPlace(BinaryOp.Pow, value);
    public Tensor clamp_(double min, double max) => BinaryScalarInPlace(BinaryOp.Maximum, min).BinaryScalarInPlace(BinaryOp.Minimum, max);

    public Tensor copy_(Tensor source)
    {
        Native.Check(Native.lh_copy_(Handle, source.Handle));
        return this;
    }

    public Tensor fill_(double value)
    {
        Native.Check(Native.lh_fill_(Handle, value));
        return this;
    }

    public Tensor zero_()
    {
        Native.Check(Native.lh_zero_(Handle));
        return this;
    }

    public Tensor uniform_(double from = 0, double to = 1)
    {
        Native.Check(Native.lh_uniform_(Handle, from, to));
        return this;
    }

    public Tensor normal_(double mean = 0, double std = 1)
    {
        Native.Check(Native.lh_normal_(Handle, mean, std));
        return this;
    }

    public Tensor masked_fill_(Tensor mask, double value)
    {
        Native.Check(Native.lh_masked_fill_(Handle, mask.Handle, value));
        return this;
    }

    public Tensor addmm_(Tensor a, Tensor b, double beta = 1.0, double alpha = 1.0)
    {
        Native.Check(Native.lh_addmm_(Handle, a.Handle, b.Handle, beta, alpha));
        return this;
    }

    // operators
    public static Tensor operator +(Tensor a, Tensor b) => a.add(b);
    public static Tensor operator +(Tensor a, double b) => a.add(b);
    public static Tensor operator +(double a, Tensor b) => b.add(a);
    public static Tensor operator -(Tensor a, Tensor b) => a.sub(b);
    public static Tensor operator -(Tensor a, double b) => a.sub(b);
    public static Tensor operator -(double a, Tensor b) => b.BinaryScalar(BinaryOp.RSub, a);
    public static Tensor operator *(Tensor a, Tensor b) => a.mul(b);
    public static Tensor operator *(Tensor a, double b) => a.mul(b);
    public static Tensor operator *(double a, Tensor b) => b.mul(a);
    public static Tensor operator /(Tensor a, Tensor b) => a.div(b);
    public static Tensor operator /(Tensor a, double b) => a.div(b);
    public static Tensor operator /(double a, Tensor b) => b.BinaryScalar(BinaryOp.RDiv, a);
    public static Tensor operator %(Tensor a, Tensor b) => a.remainder(b);
    public static Tensor operator -(Tensor a) => a.neg();
    public static Tensor operator &(Tensor a, Tensor b) => a.dtype == ScalarType.Bool ? a.logical_and(b) : a.bitwise_and(b);
    public static Tensor operator |(Tensor a, Tensor b) => a.dtype == ScalarType.Bool ? a.logical_or(b) : a.bitwise_or(b);
    public static Tensor operator !(Tensor a) => a.logical_not();

    // reductions
    private Tensor Reduce(ReduceOp op, long[]? dims, bool keepdim)
    {
        if (dims == null) return new(Native.lh_reduce((int)op, Handle, null, 0, 0, 0));
        fixed (long* d = dims) return new(Native.lh_reduce((int)op, Handle, d, dims.Length, keepdim ? 1 : 0, 1));
    }

    public Tensor sum() => Reduce(ReduceOp.Sum, null, false);
    public Tensor sum(long dim, bool keepdim = false) => Reduce(ReduceOp.Sum, [dim], keepdim);
    public Tensor sum(long[] dims, bool keepdim = false) => Reduce(ReduceOp.Sum, dims, keepdim);
    public Tensor mean() => Reduce(ReduceOp.Mean, null, false);
    public Tensor mean(long dim, bool keepdim = false) => Reduce(ReduceOp.Mean, [dim], keepdim);
    public Tensor mean(long[] dims, bool keepdim = false) => Reduce(ReduceOp.Mean, dims, keepdim);
    public Tensor max() => Reduce(ReduceOp.Amax, null, false);
    public Tensor min() => Reduce(ReduceOp.Amin, null, false);
    public Tensor amax(long dim, bool keepdim = false) => Reduce(ReduceOp.Amax, [dim], keepdim);
    public Tensor amin(long dim, bool keepdim = false) => Reduce(ReduceOp.Amin, [dim], keepdim);
    public Tensor prod() => Reduce(ReduceOp.Prod, null, false);
    public Tensor prod(long dim, bool keepdim = false) => Reduce(ReduceOp.Prod, [dim], keepdim);
    public Tensor std() => Reduce(ReduceOp.Std, null, false);
    public Tensor std(long dim, bool keepdim = false) => Reduce(ReduceOp.Std, [dim], keepdim);
    public Tensor var() => Reduce(ReduceOp.Var, null, false);
    public Tensor var(long dim, bool keepdim = false) => Reduce(ReduceOp.Var, [dim], keepdim);
    public Tensor logsumexp(long dim, bool keepdim = false) => Reduce(ReduceOp.LogSumExp, [dim], keepdim);
    public Tensor any() => Reduce(ReduceOp.Any, null, false);
    public Tensor all() => Reduce(ReduceOp.All, null, false);
    public Tensor any(long dim, bool keepdim = false) => Reduce(ReduceOp.Any, [dim], keepdim);
    public Tensor all(long dim, bool keepdim = false) => Reduce(ReduceOp.All, [dim], keepdim);
    public Tensor norm() => Reduce(ReduceOp.Norm, null, false);
    public Tensor norm(long dim, bool keepdim = false) => Reduce(ReduceOp.Norm, [dim], keepdim);

    public Tensor argmax() => new(Native.lh_argext(0, Handle, 0, 0, 0));
    public Tensor argmax(long dim, bool keepdim = false) => new(Native.lh_argext(0, Handle, dim, keepdim ? 1 : 0, 1));
    public Tensor argmin() => new(Native.lh_argext(1, Handle, 0, 0, 0));
    public Tensor argmin(long dim, bool keepdim = false) => new(Native.lh_argext(1, Handle, dim, keepdim ? 1 : 0, 1));

    private (Tensor values, Tensor indices) Pair(int kind, long dim, bool flag)
    {
        IntPtr v, i;
        Native.Check(Native.lh_max_dim(kind, Handle, dim, flag ? 1 : 0, &v, &i));
        return (new Tensor(v), new Tensor(i));
    }

    public (Tensor values, Tensor indexes) max(long dim, bool keepdim = false) => Pair(0, dim, keepdim);
    public (Tensor values, Tensor indexes) min(long dim, bool keepdim = false) => Pair(1, dim, keepdim);
    public (Tensor values, Tensor indices) sort(long dim = -1, bool descending = false) => Pair(2, dim, descending);

    public (Tensor values, Tensor indexes) topk(long k, long dim = -1, bool largest = true)
    {
        IntPtr v, i;
        Native.Check(Native.lh_topk(Handle, k, dim, largest ? 1 : 0, &v, &i));
        return (new Tensor(v), new Tensor(i));
    }

    public Tensor cumsum(long dim) => new(Native.lh_cumsum(Handle, dim));

    public bool allclose(Tensor other, double rtol = 1e-5, double atol = 1e-8)
    {
        int r;
        Native.Check(Native.lh_allclose(Handle, other.Handle, rtol, atol, &r));
        return r != 0;
    }

    /// <summary>True when shapes and every element are equal (torch.equal).</summary>
    public bool equal(Tensor other)
    {
        int r;
        Native.Check(Native.lh_equal(Handle, other.Handle, &r));
        return r != 0;
    }

    // conversion
    public Tensor to(ScalarType type) => new(Native.lh_to(Handle, (int)type, (int)device.Type, device.Index, 0, 0));

    public Tensor to(Device target, bool non_blocking = false) =>
        new(Native.lh_to(Handle, (int)dtype, (int)target.Type, target.Index, non_blocking ? 1 : 0, 0));

    public Tensor to(Device target, ScalarType type, bool non_blocking = false) =>
        new(Native.lh_to(Handle, (int)type, (int)target.Type, target.Index, non_blocking ? 1 : 0, 0));

    public Tensor to(string target) => to(Device.Parse(target));
    public Tensor cpu() => to(Device.CPU);
    public Tensor cuda(int index = 0) => to(new Device(DeviceType.CUDA, index));
    public Tensor @float() => to(ScalarType.Float32);
    public Tensor bfloat16() => to(ScalarType.BFloat16);
    public Tensor half() => to(ScalarType.Float16);
    public Tensor @long() => to(ScalarType.Int64);
    public Tensor @int() => to(ScalarType.Int32);
    public Tensor @bool() => to(ScalarType.Bool);
    public Tensor type_as(Tensor other) => to(other.dtype);
}
