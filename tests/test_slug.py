import pytest

from proxy.core.slug import endpoint_slug, slugify


@pytest.mark.parametrize(
    "cluster, framework, model, slug",
    [
        ("my-cluster", "my-framework", "meta-llama/Meta-Llama-3.1-70B-Instruct",
         "my-cluster-my-framework-meta-llamameta-llama-31-70b-instruct"),
        ("sophia", "vllm", "meta-llama/Meta-Llama-3.1-8B-Instruct",
         "sophia-vllm-meta-llamameta-llama-31-8b-instruct"),
        ("your-cluster", "api", "Your-Model-70B", "your-cluster-api-your-model-70b"),
        ("metis", "api", "gpt-oss-120b-131072", "metis-api-gpt-oss-120b-131072"),
        ("polaris", "vllm", "Qwen/Qwen2.5:7B_Instruct", "polaris-vllm-qwenqwen257b_instruct"),
    ],
)  # fmt: skip
def test_endpoint_slug_examples(cluster: str, framework: str, model: str, slug: str) -> None:
    assert endpoint_slug(cluster, framework, model) == slug


@pytest.mark.parametrize(
    "value, slug",
    [
        ("  Hello   World  ", "hello-world"),
        ("a -- b", "a-b"),
        ("--_edge_--", "edge"),
        ("Crème Brûlée", "creme-brulee"),
        ("tabs\tand\nlines", "tabs-and-lines"),
        ("日本語 model", "model"),
        ("a/b.c:d", "abcd"),
    ],
)
def test_slugify_follows_django(value: str, slug: str) -> None:
    assert slugify(value) == slug
