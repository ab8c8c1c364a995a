"""YatGemm in each of its forms, all derived from yatdeploy.spec.YAT_GEMM."""
