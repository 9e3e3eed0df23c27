using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class nn
    {
        public static partial class functional
        {
            /// <summary>
            /// Rotary embedding of q and k (rotate_half convention) with k and v repeated to q's head count (grouped-query
            /// attention: query head i uses kv head i / (heads / kv_heads), as transformers' repeat_kv). q (batch, heads,
            /// seq, head_dim), k and v (batch, kv_heads, seq, head_dim); tables cos, sin (seq, head_dim), or (batch, seq,
            /// head_dim) gathered per position (packed rows). Returns (q, k, v), each (batch, heads, seq, head_dim); with
            /// kv_heads == heads, v itself. With <paramref name="repeat"/> false (for an attention that takes grouped heads
            /// itself, <see cref="scaled_dot_product_attention_takes_gqa"/>) k and v keep their kv_heads: k rotated, v
            /// copied by the same kernel (so that backward still writes dq, dk, dv side by side for the stacked q/k/v
            /// bases, see <see cref="RopeGqaFunction"/>).
            /// </summary>
            /// <remarks>
            /// On CUDA (fp32, fp16, bf16 with fp32 tables, <see cref="Fused.Rope"/> on, LORAHUB_ROPE_GQA_KERNEL not 0) one
            /// kernel each way for all three: forward rotates in fp32 with one rounding (as <see cref="rotary_embedding"/>)
            /// and writes (batch, seq, heads, head_dim) memory, which SDPA reads as it is; backward sums each kv head's
            /// group in fp32 and rotates dk back in the same pass, one rounding (the composite path rounds the group sum
            /// first). Measured per llama-1b layer (4×2048 tokens, 32/8 heads, bf16, H200): 38.5 µs forward, 40.8 µs
            /// backward (3.3-3.5 TB/s), where rope kernels per tensor, the expand-and-copy repeat and its reduction took
            /// about 330 µs; the step went from 127.2 to 124.0 ms. Writing k and v (batch, heads, seq, head_dim) instead
            /// (LORAHUB_ROPE_GQA_KV_LAYOUT=bhtd) measured the same. Elsewhere: <see cref="rotary_embedding"/> and an
            /// expand-and-copy repeat.
            /// </remarks>
            public static (Tensor q, Tensor k, Tensor v) rotary_embedding_gqa(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, bool? fused = null,
                bool repeat = true)
            {
                // Checked from one read of each shape, messages built only on failure: this runs per layer and step.
                long[] qs = q.shape, ks = k.shape, vs = v.shape;
                if (qs.Length != 4 || ks.Length != 4 || vs.Length != 4)
                    ArgumentError($"rotary_embedding_gqa expects 4-d (batch, heads, seq, head_dim) q, k, v; got {Dims(qs)}, {Dims(ks)}, {Dims(vs)}");
                long b = qs[0], heads = qs[1], t = qs[2], d = qs[3], kvHeads = ks[1];
                if (d % 2 != 0) ArgumentError($"rotary embedding needs an even head_dim, got {d}");
                if (!ks.SequenceEqual(vs) || ks[0] != b || ks[2] != t || ks[3] != d)
                    ArgumentError($"rotary_embedding_gqa: k {Dims(ks)} and v {Dims(vs)} must be (batch, kv_heads, seq, head_dim) of q {Dims(qs)}");
                if (kvHeads <= 0 || heads % kvHeads != 0) ArgumentError($"rotary_embedding_gqa: q's heads ({heads}) must be a multiple of k's ({kvHeads})");
                var dtype = q.dtype;
                if (k.dtype != dtype || v.dtype != dtype) ArgumentError($"rotary_embedding_gqa: q, k, v differ in dtype ({dtype}, {k.dtype}, {v.dtype})");
                foreach (var table in new[] { cos, sin })
                    if (!RopeTableFits(table, b, t, d))
                        ArgumentError($"rotary tables must be (seq, head_dim) = ({t}, {d}) or (batch, seq, head_dim), got {Dims(table.shape)}");
                if (!KernelTensors.SameDevice(k, q) || !KernelTensors.SameDevice(v, q) || !KernelTensors.SameDevice(cos, q) || !KernelTensors.SameDevice(sin, q))
                    ArgumentError("rotary_embedding_gqa: q, k, v and the tables are on different devices");
                var groups = heads / kvHeads;
                if ((fused ?? Fused.Rope) && RopeGqaFusable(q, cos, sin))
                {
                    try
                    {
                        using var scope = NewDisposeScope();
                        var (c, s) = (UnitLastStride(cos), UnitLastStride(sin));
                        // Equal head counts: q and k only. Grouped heads left grouped: v copied beside them (groups of 1).
                        Tensor[] outputs = groups == 1 ? new RopeGqaFunction(1).apply(q, k, null, c, s)
                            : repeat ? new RopeGqaFunction(groups).apply(q, k, v, c, s)
                            : new RopeGqaFunction(1).apply(q, k, v, c, s);
                        foreach (var o in outputs) o.MoveToOuterDisposeScope();
                        return (outputs[0], outputs[1], groups == 1 ? v : outputs[2]);
                    }
                    catch (KernelCompileException)
                    {
                        // The driver refused the compiled module: the kernels are off from now on; this call takes the composite ops.
                    }
                }
                return RopeGqaComposite(q, k, v, cos, sin, repeat ? groups : 1, fused);
            }

            /// <summary>Whether a rotary table is (seq, head_dim), or (batch, seq, head_dim) gathered per position, for these sizes.</summary>
            internal static bool RopeTableFits(Tensor table, long batch, long seq, long headDim)
            {
                var ts = table.shape;
                return (ts.Length == 2 && ts[0] == seq && ts[1] == headDim) || (ts.Length == 3 && ts[0] == batch && ts[1] == seq && ts[2] == headDim);
            }

            /// <summary>
            /// Whether <see cref="rotary_embedding_gqa"/> runs its kernel for these arguments (with <see cref="Fused.Rope"/>
            /// on): a CUDA q of fp32, fp16 or bf16, fp32 tables, the kernel switched on (<see cref="FusedRopeGqa"/>) and
            /// compiled for the device. Callers with a cheaper path of their own take it when this is false.
            /// </summary>
            public static bool rotary_embedding_gqa_is_fused(Tensor q, Tensor cos, Tensor sin) => Fused.Rope && RopeGqaFusable(q, cos, sin);

            private static bool RopeGqaFusable(Tensor q, Tensor cos, Tensor sin) =>
                q.dim() == 4 && cos.dtype == ScalarType.Float32 && sin.dtype == ScalarType.Float32 && RopeGqaKernels.Available(q) &&
                q.size(0) * q.size(2) <= int.MaxValue && q.size(1) * q.size(3) <= int.MaxValue;

            /// <summary>
            /// The per-token rope kernels (<see cref="rotary_embedding_gqa"/>'s, and <see cref="rotary_embedding"/>'s on
            /// CUDA). Default on; LORAHUB_ROPE_GQA_KERNEL=0 turns them off: rotary_embedding then takes its older kernel
            /// and rotary_embedding_gqa that and an expand-and-copy repeat. Settable at run time.
            /// </summary>
            public static bool FusedRopeGqa
            {
                get => RopeGqaKernels.Enabled;
                set => RopeGqaKernels.Enabled = value;
            }

            /// <summary>Launches of the rope kernels (rotary_embedding_gqa's and rotary_embedding's per-token one), for tests and diagnostics.</summary>
            public static long FusedRopeGqaLaunches => RopeGqaKernels.GqaLaunches + RopeGqaKernels.RopeLaunches;

            private static string Dims(long[] shape) => "[" + string.Join(", ", shape) + "]";

            private static void ArgumentError(string message) => throw new TorchException(TorchErrorKind.Argument, message);

            private static Tensor UnitLastStride(Tensor t) => t.stride(-1) == 1 ? t : t.contiguous();

            // rotary_embedding (its kernel on CUDA where it applies) and a broadcast view of k and v copied once to the groups.
            private static (Tensor q, Tensor k, Tensor v) RopeGqaComposite(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, long groups, bool? fused)
            {
                using var scope = NewDisposeScope();
                Tensor qr, kr;
                if (cos.dim() == 2)
                    (qr, kr) = (rotary_embedding(q, cos, sin, fused), rotary_embedding(k, cos, sin, fused));
                else
                {
                    // Tables per (batch, position): broadcast over the heads.
                    var (c, s) = (cos.unsqueeze(1), sin.unsqueeze(1));
                    (qr, kr) = (RopeComposite(q, c, s), RopeComposite(k, c, s));
                }
                if (groups == 1) return (qr.MoveToOuterDisposeScope(), kr.MoveToOuterDisposeScope(), v);
                var (b, kvHeads, t, d) = (k.size(0), k.size(1), k.size(2), k.size(3));
                kr = kr.unsqueeze(2).expand(b, kvHeads, groups, t, d).reshape(b, kvHeads * groups, t, d);
                var vr = v.unsqueeze(2).expand(b, kvHeads, groups, t, d).reshape(b, kvHeads * groups, t, d);
                return (qr.MoveToOuterDisposeScope(), kr.MoveToOuterDisposeScope(), vr.MoveToOuterDisposeScope());
            }
        }
    }
}
