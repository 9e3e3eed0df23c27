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
            /// Attention over (batch, heads, seq, head_dim) through libtorch's fused SDPA (flash / memory-efficient kernels
            /// where they apply), with the two arguments TorchSharp 0.107 does not pass on: <paramref name="scale"/> and
            /// <paramref name="enable_gqa"/>. attn_mask: bool (true = attend) or additive float, broadcastable to
            /// (batch, heads, seq_q, seq_k).
            /// </summary>
            /// <remarks>
            /// scale: libtorch scales by 1/√head_dim; another scale is applied by multiplying q by scale·√head_dim first.
            /// enable_gqa: key and value may have fewer heads than query (query head i uses kv head i / (heads / kv_heads), as
            /// PyTorch's repeat_interleave). k and v are not copied to the query's head count: query heads are split into
            /// groups of strided views (b, kv_heads, seq, d), one per position inside a group, and each group attends to the
            /// unrepeated k and v through the fused kernel; the outputs are stacked back into (b, heads, seq, d). The
            /// causal mask stays exact (each call sees the true positions); the cost is one output-sized copy and
            /// heads/kv_heads kernel launches instead of two copies of k and v kept alive for backward.
            /// </remarks>
            public static Tensor scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask = null,
                double dropout_p = 0.0, bool is_causal = false, double? scale = null, bool enable_gqa = false)
            {
                using var scope = NewDisposeScope();
                var q = Scaled(query, scale);
                var heads = query.size(-3);
                var kvHeads = key.size(-3);
                Tensor result;
                if (!enable_gqa || heads == kvHeads)
                    result = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask, dropout_p, is_casual: is_causal);
                else
                {
                    if (query.dim() != 4 || key.dim() != 4 || value.dim() != 4)
                        throw new ArgumentException($"grouped-query attention expects 4-d (batch, heads, seq, head_dim) tensors; got query {Shape(query)}, key {Shape(key)}, value {Shape(value)}");
                    if (value.size(1) != kvHeads || heads % kvHeads != 0)
                        throw new ArgumentException($"grouped-query attention needs the query's heads ({heads}) to be a multiple of the key's and value's ({kvHeads}, {value.size(1)})");
                    result = GroupedQueryAttention(q, key, value, attn_mask, dropout_p, is_causal, heads / kvHeads);
                }
                return result.MoveToOuterDisposeScope();
            }

            private static Tensor Scaled(Tensor query, double? scale)
            {
                if (scale is not { } s) return query;
                var factor = s * Math.Sqrt(query.size(-1));
                return Math.Abs(factor - 1.0) < 1e-12 ? query : query.mul(factor);
            }

            private static Tensor GroupedQueryAttention(Tensor q, Tensor k, Tensor v, Tensor? mask, double dropout, bool causal, long groups)
            {
                var (b, heads, s, d) = (q.size(0), q.size(1), q.size(2), q.size(3));
                var kvHeads = heads / groups;
                // (b, kv_heads, groups, s, d): a view whatever q's strides are (it only splits the head dimension).
                var grouped = q.view(b, kvHeads, groups, s, d);
                var groupedMask = mask is not null && mask.dim() == 4 && mask.size(1) == heads
                    ? mask.reshape(mask.size(0), kvHeads, groups, mask.size(2), mask.size(3))
                    : null;
                var outputs = new Tensor[groups];
                for (var g = 0; g < groups; g++)
                {
                    var maskG = groupedMask is null ? mask : groupedMask.select(2, g);
                    outputs[g] = torch.nn.functional.scaled_dot_product_attention(grouped.select(2, g), k, v, maskG, dropout, is_casual: causal);
                }
                return torch.stack(outputs, 2).view(b, heads, s, v.size(-1));
            }

            private static string Shape(Tensor t) => "[" + string.Join(", ", t.shape) + "]";
        }
    }
}
