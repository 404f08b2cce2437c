"""Operations: warm, survey, cache tools, doctor, metrics."""
