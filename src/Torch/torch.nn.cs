namespace LoRAHub.Torch;

public static unsafe partial class torch
{
    public static partial class nn
    {
        /// <summary>Stateless layers (torch.nn.functional).</summary>
        public static class functional
        {
            public static Tensor linear(Tensor input, Tensor weight, Tensor? bias = null) =>
                new(Native.lh_linear(input.Handle, weight.Handle, bias?.Handle ?? IntPtr.Zero));

            public static Tensor embedding(Tensor input, Tensor weight, long padding_idx = -1) =>
                new(Native.lh_embedding(weight.Handle, input.Handle, padding_idx));

            public static Tensor layer_norm(Tensor input, long[] normalized_shape, Tensor? weight = null, Tensor? bias = null, double eps = 1e-5)
            {
                fixed (long* s = normalized_shape)
                    return new(Native.lh_layer_norm(input.Handle, s, normalized_shape.Length, weight?.Handle ?? IntPtr.Zero, bias?.Handle ?? IntPtr.Zero, eps));
            }

            /// <summary>
            /// RMS norm over the last dimension, in float32, then cast back and scaled (Llama's RMSNorm). On CUDA (fp32, fp16,
            /// bf16 with a weight of the input's dtype) one fused kernel each way; <paramref name="fused"/> overrides
            /// <see cref="Fused.RmsNorm"/> (false: the composite libtorch ops).
            /// </summary>
            public static Tensor rms_norm(Tensor input, Tensor? weight = null, double eps = 1e-6, bool? fused = null) =>
                new(Native.lh_fused_rms_norm(input.Handle, weight?.Handle ?? IntPtr.Zero, eps, (fused ?? Fused.RmsNorm) ? 1 : 0));

            /// <summary>silu(gate) · up, Llama's SwiGLU; one fused kernel each way on CUDA (see <see cref="Fused.SwiGlu"/>).</summary>
            public static Tensor swiglu(Tensor gate, Tensor up, bool? fused = null) =>
                new(Native.lh_fused_swiglu(gate.Handle, up.Handle, (fused ?? Fused.SwiGlu) ? 1 : 0));

            /// <summary>
            /// Rotary position embedding, rotate_half convention: x·cos + rotate_half(x)·sin for x (batch, heads, seq, head_dim)
            /// and tables cos, sin (seq, head_dim). On CUDA with float32 tables one fused kernel each way, which keeps x's
            /// memory layout (see <see cref="Fused.Rope"/>); elsewhere the tables are cast to x's dtype first.
            /// </summary>
            public static Tensor rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool? fused = null) =>
                new(Native.lh_fused_rope(x.Handle, cos.Handle, sin.Handle, (fused ?? Fused.Rope) ? 1 : 0));

            /// <summary>
            /// DoRA's output y = t + c·(t − bias) with the correction c = m/‖V‖ − 1 formed in <paramref name="magnitude"/>'s
            /// dtype (fp32 masters: fp32), t (…, out) the base output plus the LoRA term, magnitude, norm, bias (out); autograd
            /// reaches t, the magnitude and the norm (detach it for DoRA's constant norm) and a trainable bias. On CUDA (t in
            /// fp32, fp16 or bf16, bias frozen) one kernel forward and one pass plus a column reduce backward, with c in fp32
            /// registers, keeping y rather than t for backward (see <see cref="Fused.Dora"/>); elsewhere the composite ops
            /// t.addcmul(t, c) − bias·c with c cast to t's dtype.
            /// </summary>
            public static Tensor dora_output(Tensor t, Tensor magnitude, Tensor norm, Tensor? bias = null, bool? fused = null) =>
                new(Native.lh_dora_output(t.Handle, magnitude.Handle, norm.Handle, bias?.Handle ?? IntPtr.Zero, (fused ?? Fused.Dora) ? 1 : 0));

            /// <summary>
            /// Row norms ‖W0 + s·B·A‖ (W0 out×in, A r×in, B out×r) from the cached squares ‖W0_i‖² (whose dtype, fp32 or
            /// fp64, the result has), without weight-sized temporaries: ‖W0_i‖² + Σ_k B_ik·(2s·W0·Aᵀ + s²·B·A·Aᵀ)_ik, clamped
            /// at 0 before the square root; W0·Aᵀ in W0's dtype. One native call (the ops run in C++); differentiable in A and B.
            /// </summary>
            public static Tensor dora_weight_norm(Tensor w0, Tensor base_norms_squared, Tensor a, Tensor b, double scaling) =>
                new(Native.lh_dora_weight_norm(w0.Handle, base_norms_squared.Handle, a.Handle, b.Handle, scaling));

            /// <summary>
            /// Switches for the fused CUDA kernels, read once from LORAHUB_FUSED: unset or "1" turns all on, "0" all off,
            /// otherwise a comma-separated list of those to turn on (rmsnorm, swiglu, rope, gqa, dora, doranorm). Settable
            /// at run time.
            /// </summary>
            public static class Fused
            {
                static Fused()
                {
                    var spec = Environment.GetEnvironmentVariable("LORAHUB_FUSED")?.Trim().ToLowerInvariant();
                    if (string.IsNullOrEmpty(spec) || spec == "1" || spec == "all") { RmsNorm = SwiGlu = Rope = Gqa = Dora = DoraNorm = true; return; }
                    if (spec is "0" or "none") return;
                    var names = spec.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
                    foreach (var name in names)
                        if (name is not ("rmsnorm" or "swiglu" or "rope" or "gqa" or "dora" or "doranorm"))
                            throw new ArgumentException($"LORAHUB_FUSED: unknown kernel '{name}' (rmsnorm, swiglu, rope, gqa, dora, doranorm; or 0 / 1)");
                    RmsNorm = names.Contains("rmsnorm");
                    SwiGlu = names.Contains("swiglu");
                    Rope = names.Contains("rope");
                    Gqa = names.Contains("gqa");
                    Dora = names.Contains("dora");
                    DoraNorm = names.Contains("doranorm");
                }

                /// <summary>Fused RMSNorm kernels (forward and backward).</summary>
                public static bool RmsNorm { get; set; }
                /// <summary>Fused silu(gate) · up kernels.</summary>
                public static bool SwiGlu { get; set; }
                /// <summary>Fused rotary-embedding kernels.</summary>
                public static bool Rope { get; set; }
                /// <summary>Grouped-query attention without copying k/v to the query's head count (libtorch ≥ 2.5's enable_gqa).</summary>
                public static bool Gqa { get; set; }
                /// <summary>The fused DoRA output kernels (<see cref="dora_output"/>, forward and backward).</summary>
                public static bool Dora { get; set; }
                /// <summary>
                /// DoRA's weight norm as one native call (<see cref="dora_weight_norm"/>), cached per layer between the forward
                /// and the checkpoint recompute of a step (false: the plugin's C# ops, computed on every forward). Not a kernel;
                /// a switch here so one run can measure with and without it.
                /// </summary>
                public static bool DoraNorm { get; set; }

                /// <summary>True when the native library was built with the CUDA kernels (against a CUDA libtorch).</summary>
                public static bool KernelsAvailable => Native.lh_fused_kernels_available() != 0;

                /// <summary>Fused kernels launched so far in this process (forward and backward), for tests and diagnostics.</summary>
                public static long LaunchCount => Native.lh_fused_launch_count() + Native.lh_dora_launch_count();
            }

            public static Tensor softmax(Tensor input, long dim, ScalarType? dtype = null) =>
                new(Native.lh_softmax(input.Handle, dim, dtype.HasValue ? (int)dtype.Value : -1));

            public static Tensor log_softmax(Tensor input, long dim, ScalarType? dtype = null) =>
                new(Native.lh_log_softmax(input.Handle, dim, dtype.HasValue ? (int)dtype.Value : -1));

            /// <summary>Cross-entropy over logits (N, C) and class targets (N); targets equal to ignore_index add no loss.</summary>
            public static Tensor cross_entropy(Tensor input, Tensor target, long ignore_index = -100, Reduction reduction = Reduction.Mean, double label_smoothing = 0.0) =>
                new(Native.lh_cross_entropy(input.Handle, target.Handle, ignore_index, (int)reduction, label_smoothing));

            /// <summary>
            /// Mean cross-entropy of (hidden · weightᵀ) against labels without materialising all logits: rows are
            /// processed chunk by chunk in fp32 and recomputed in backward. hidden (N, D), weight (V, D), labels (N).
            /// </summary>
            public static Tensor chunked_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, long chunk_size = 1024, long ignore_index = -100) =>
                new(Native.lh_chunked_cross_entropy(hidden.Handle, weight.Handle, labels.Handle, chunk_size, ignore_index));

            public static Tensor nll_loss(Tensor input, Tensor target, long ignore_index = -100, Reduction reduction = Reduction.Mean) =>
                new(Native.lh_nll_loss(input.Handle, target.Handle, ignore_index, (int)reduction));

            public static Tensor mse_loss(Tensor input, Tensor target, Reduction reduction = Reduction.Mean) =>
                new(Native.lh_mse_loss(input.Handle, target.Handle, (int)reduction));

            public static Tensor dropout(Tensor input, double p = 0.5, bool training = true) =>
                new(Native.lh_dropout(input.Handle, p, training ? 1 : 0));

            /// <summary>
            /// Attention over (batch, heads, seq, head_dim): libtorch's fused flash / memory-efficient kernels where the
            /// libtorch has them (2.x), explicit math otherwise. attn_mask: bool (true = attend) or additive float.
            /// </summary>
            /// <remarks>
            /// enable_gqa: key and value may have fewer heads than query (dividing them); libtorch ≥ 2.5 attends without
            /// copying them, older libtorch expands them first.
            /// </remarks>
            public static Tensor scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask = null,
                double dropout_p = 0.0, bool is_causal = false, double? scale = null, bool enable_gqa = false) =>
                enable_gqa
                    ? new(Native.lh_sdpa_gqa(query.Handle, key.Handle, value.Handle, attn_mask?.Handle ?? IntPtr.Zero, dropout_p,
                        is_causal ? 1 : 0, scale ?? 0, scale.HasValue ? 1 : 0))
                    : new(Native.lh_sdpa(query.Handle, key.Handle, value.Handle, attn_mask?.Handle ?? IntPtr.Zero, dropout_p,
                        is_causal ? 1 : 0, scale ?? 0, scale.HasValue ? 1 : 0));

            public static Tensor silu(Tensor x) => x.silu();
            public static Tensor gelu(Tensor x, string approximate = "none") => x.gelu(approximate);
            public static Tensor relu(Tensor x) => x.relu();
            public static Tensor sigmoid(Tensor x) => x.sigmoid();
            public static Tensor tanh(Tensor x) => x.tanh();
            public static Tensor one_hot(Tensor x, long num_classes = -1) => new(Native.lh_one_hot(x.Handle, num_classes));
        }

        public static class utils
        {
            /// <summary>Scales gradients so their total 2-norm is at most max_norm; returns the norm before clipping.</summary>
            public static double clip_grad_norm_(IEnumerable<Tensor> parameters, double max_norm)
            {
                var handles = parameters.Select(p => p.Handle).ToArray();
                double norm;
                fixed (IntPtr* p = handles) Native.Check(Native.lh_clip_grad_norm(p, handles.Length, max_norm, &norm));
                return norm;
            }
        }
    }
}
