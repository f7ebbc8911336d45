#!/bin/sh
# Seeds corpus/signatures with the real signatures in ../../shared/fixtures/sigstore, in the
# input format fuzz_targets/signatures.rs reads (its first byte: format and digest).
set -e
cd "$(dirname "$0")"
F=../../shared/fixtures/sigstore
S=$F/cosign-simplesigning
mkdir -p corpus/signatures
{ printf '\000'; cat $F/cosign-v3-image-bundle/*.json; } > corpus/signatures/bundle-image
{ printf '\004'; cat $F/cosign-oci-attestation/*.json; } > corpus/signatures/bundle-attestation
n=2
for dir in dir-img-cosign-valid dir-img-cosign-key-rekor-valid dir-img-cosign-fulcio-rekor-valid; do
  d=$S/$dir
  {
    printf "\\$(printf '%03o' $((n * 4 + 1)))"
    cat $d/payload.json; printf '\377'
    cat $d/signature.b64; printf '\377'
    [ -f $d/cert.pem ] && cat $d/cert.pem; printf '\377'
    [ -f $d/rekor-bundle.json ] && cat $d/rekor-bundle.json
    true
  } > corpus/signatures/legacy-$dir
  n=$((n + 1))
done
# The key-only signature again, under the policy without a trusted root (bit 1).
{ printf '\013'; tail -c +2 corpus/signatures/legacy-dir-img-cosign-valid; } > corpus/signatures/legacy-keys-only
for c in $F/conformance/*/bundle.sigstore.json; do
  { printf '\000'; cat $c; } > "corpus/signatures/conformance-$(basename $(dirname $c))"
done
