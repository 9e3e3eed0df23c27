using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// q and k rotated, k and v repeated <c>groups</c> times (1: k and v keep their heads, v copied), as one CUDA kernel each way
/// (inputs: q (B, Hq, T, D), k (B, Hkv, T, D), optional v (B, Hkv, T, D), fp32 tables cos, sin (T, D) or (B, T, D)).
/// Outputs are (B, T, heads, D) memory viewed as (B, heads, T, D), the layout SDPA's kernels read without a copy; the
/// input gradients are (B, T, H, D) memory too, which is the projections' layout, so the views back to them are free; by default
/// (<see cref="RopeGqaKernels.AdjacentGradients"/>), with stacked bases (<see cref="StackedBases.Enabled"/>) or with q, k, v
/// given as column blocks of one buffer (the stacked forward's output) column blocks of one (B, T, Hq + 2·Hkv, D)
/// buffer, q then k then v, so the fused q/k/v block's input gradient can be one GEMM over its stacked bases. Without v
/// (k and q with equal head counts, no repeat) only q and k are rotated.
/// </summary>
internal sealed class RopeGqaFunction(long groups) : CustomFunction
{
    private Tensor? cos, sin;
    private long qheads, kvheads;
    private bool hasV, adjacent;
    private ScalarType dtype;

    protected override string name => "rotary_embedding_gqa";

    // Gradients in q's dtype with unit stride along head_dim, as the kernel reads them.
    private Tensor UnitLastStride(Tensor t)
    {
        if (t.dtype != dtype) t = t.to(dtype);
        return t.stride(-1) == 1 ? t : t.contiguous();
    }

    // (B, heads, T, D) over (B, T, heads, D) memory; a tensor of its own, not a view (autograd forbids in-place ops on
    // views created inside a custom function).
    private static Tensor Dense(Tensor like, long heads)
    {
        long t = like.size(2), d = like.size(3);
        return empty_strided([like.size(0), heads, t, d], [t * heads * d, d, heads * d, 1], like.dtype, like.device);
    }

    // Whether q, k (and v) are column blocks of one (B, T, Hq + Hkv (+ Hkv), D) buffer, q then k then v (the stacked
    // q/k/v forward's output): their gradients then take that layout too.
    private static bool Adjacent(Tensor q, Tensor k, Tensor? v)
    {
        long d = q.size(3), es = q.element_size(), width = (q.size(1) + k.size(1) + (v?.size(1) ?? 0)) * d;
        bool Follows(Tensor a, Tensor b) => (long)torchx.data_ptr(b) == (long)torchx.data_ptr(a) + a.size(1) * d * es
            && b.stride(2) == width && b.stride(1) == d && b.stride(0) == a.stride(0);
        return q.stride(2) == width && q.stride(1) == d && Follows(q, k) && (v is null || Follows(k, v));
    }

    protected override Tensor[] forward(Tensor?[] inputs)
    {
        dtype = inputs[0]!.dtype;
        var q = UnitLastStride(inputs[0]!);
        var k = UnitLastStride(inputs[1]!);
        var v = inputs[2] is null ? null : UnitLastStride(inputs[2]!);
        (cos, sin) = (save(inputs[3]!), save(inputs[4]!));
        (qheads, kvheads, hasV) = (q.size(1), k.size(1), v is not null);
        adjacent = StackedBases.Enabled || RopeGqaKernels.AdjacentGradients || Adjacent(q, k, v);
        var qo = Dense(q, qheads);
        var headMajor = RopeGqaKernels.KvHeadMajor;
        Tensor KvOut(Tensor like) => headMajor
            ? empty([like.size(0), kvheads * groups, like.size(2), like.size(3)], like.dtype, like.device)
            : Dense(like, kvheads * groups);
        var ko = KvOut(k);
        var vo = v is null ? null : KvOut(v);
        RopeGqaKernels.Gqa(q, qo, k, ko, v, vo, cos, sin, qheads, kvheads, groups, backward: false, headMajor);
        return vo is null ? [qo, ko] : [qo, ko, vo];
    }

    protected override Tensor?[] backward(Tensor[] grad_outputs)
    {
        var dqo = UnitLastStride(grad_outputs[0]);
        var dko = UnitLastStride(grad_outputs[1]);
        var dvo = hasV ? UnitLastStride(grad_outputs[2]) : null;
        if (!adjacent)
        {
            var (sq, sk, sv) = (Dense(dqo, qheads), Dense(dko, kvheads), dvo is null ? null : Dense(dvo, kvheads));
            RopeGqaKernels.Gqa(dqo, sq, dko, sk, dvo, sv, cos!, sin!, qheads, kvheads, groups, backward: true);
            return [sq, sk, sv, null, null];
        }
        // With stacked bases: dq, dk (and dv) as adjacent column blocks of one (B, T, Hq + Hkv (+ Hkv), D) buffer, q then
        // k then v: the projections' gradients are then column slices of one (tokens, Nq + Nk + Nv) matrix, whose input
        // gradient the fused q/k/v block takes as one GEMM with its stacked weights (StackedBases).
        long b = dqo.size(0), t = dqo.size(2), d = dqo.size(3), heads = qheads + (hasV ? 2 : 1) * kvheads;
        var all = empty([b, t, heads, d], dqo.dtype, dqo.device);
        Tensor Block(long first, long count) => all.narrow(2, first, count).transpose(1, 2);
        var dq = Block(0, qheads);
        var dk = Block(qheads, kvheads);
        var dv = dvo is null ? null : Block(qheads + kvheads, kvheads);
        RopeGqaKernels.Gqa(dqo, dq, dko, dk, dvo, dv, cos!, sin!, qheads, kvheads, groups, backward: true, outTokenStride: heads * d);
        return [dq, dk, dv, null, null];
    }
}
